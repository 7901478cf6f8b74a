"""Instruction parsing: ###path### references, the <IMGPAD>/<VIDPAD> planning text, the prompt, confinement."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from unison_runtime.errors import InstructionError, PathError
from unison_runtime.instruction import (
    IMAGE_EXTENSIONS,
    MAX_INSTRUCTION_CHARS,
    MAX_REFERENCES,
    VIDEO_EXTENSIONS,
    media_kind,
    parse_instruction,
)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".jpeg", ".webp", ".bmp"])
def test_image_extensions(ext: str) -> None:
    assert ext in IMAGE_EXTENSIONS
    for name in (f"a{ext}", f"dir/b{ext.upper()}", f"./c.d{ext}"):
        assert media_kind(name) == "image"
        instruction = parse_instruction(f"Look at ###{name}###")
        assert instruction.media[0].kind == "image"
        assert instruction.planning_text == "Look at <IMGPAD>"


@pytest.mark.parametrize("ext", [".mp4", ".avi", ".mov", ".webm", ".mkv"])
def test_video_extensions(ext: str) -> None:
    assert ext in VIDEO_EXTENSIONS
    for name in (f"a{ext}", f"clips/b{ext.upper()}"):
        assert media_kind(name) == "video"
        instruction = parse_instruction(f"Watch ###{name}###")
        assert instruction.media[0].kind == "video"
        assert instruction.planning_text == "Watch <VIDPAD>"


@pytest.mark.parametrize("name", ["a.gif", "a.txt", "noextension", "a.png.exe", "a.tiff", ".png", "a.mp3"])
def test_unsupported_extension_is_refused_with_the_accepted_list(name: str) -> None:
    with pytest.raises(PathError) as err:
        parse_instruction(f"Edit ###{name}### please")
    message = str(err.value)
    assert repr(name) in message
    assert all(ext in message for ext in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS)


def test_references_become_pads_in_the_planning_text_and_in_the_umt5_prompt() -> None:
    text = "I have an image ###a.png### and a mask ###b.png###. Make a video like ###c.mp4###!"
    instruction = parse_instruction(text)
    assert instruction.text == text
    assert instruction.planning_text == "I have an image <IMGPAD> and a mask <IMGPAD>. Make a video like <VIDPAD>!"
    # Unison's inference.py hands stage two the same padded text: umT5 encodes the pads too.
    assert instruction.prompt == instruction.planning_text
    assert [(m.path, m.kind, m.role) for m in instruction.media] == [
        ("a.png", "image", "context"),
        ("b.png", "image", "context"),
        ("c.mp4", "video", "context"),
    ]
    assert instruction.resolved == ()


@pytest.mark.parametrize(
    ("text", "prompt"),
    [
        ("###a.png### What is this?", "<IMGPAD> What is this?"),
        ("Describe ###a.png### .", "Describe <IMGPAD> ."),
        ("A cat (###a.png###) on a mat", "A cat (<IMGPAD>) on a mat"),
        ("Line one ###a.mov###\n  line two", "Line one <VIDPAD>\n  line two"),
        ("###a.png######b.png###", "<IMGPAD><IMGPAD>"),
        ("no references at all", "no references at all"),
        ("  spaced   out  ", "  spaced   out  "),  # Wan's whitespace cleaning runs right before umT5
    ],
)
def test_prompt_is_the_text_with_pads_as_the_reference_passes_it(text: str, prompt: str) -> None:
    assert parse_instruction(text).prompt == prompt


def test_reference_order_and_repeats_are_kept() -> None:
    instruction = parse_instruction("###b.png### then ###a.png### then ###b.png###")
    assert [m.path for m in instruction.media] == ["b.png", "a.png", "b.png"]
    assert instruction.planning_text == "<IMGPAD> then <IMGPAD> then <IMGPAD>"


def test_reference_spaces_are_trimmed() -> None:
    assert parse_instruction("### my photo.png ###").media[0].path == "my photo.png"


def test_kinds_name_extensionless_media_wired_in_a_graph() -> None:
    kinds = {"image_1": "image", "mask_1": "video"}
    instruction = parse_instruction("Edit ###image_1### with ###mask_1###", kinds=kinds)  # type: ignore[arg-type]
    assert [(m.path, m.kind) for m in instruction.media] == [("image_1", "image"), ("mask_1", "video")]
    assert instruction.planning_text == "Edit <IMGPAD> with <VIDPAD>"


@pytest.mark.parametrize(
    "reference", ["", "   ", "a\x00.png", "a\n.png", "a\x1b.png", "a\x7f.png", "x" * 2000 + ".png"]
)
def test_bad_reference_text_is_refused(reference: str) -> None:
    with pytest.raises(PathError):
        parse_instruction(f"Edit ###{reference}###")


def test_too_many_references_and_too_long_instructions_are_refused() -> None:
    with pytest.raises(PathError, match=str(MAX_REFERENCES)):
        parse_instruction(" ".join(f"###{i}.png###" for i in range(MAX_REFERENCES + 1)))
    assert len(parse_instruction(" ".join(f"###{i}.png###" for i in range(MAX_REFERENCES))).media) == MAX_REFERENCES
    with pytest.raises(PathError, match=str(MAX_INSTRUCTION_CHARS)):
        parse_instruction("a" * (MAX_INSTRUCTION_CHARS + 1))


def test_instruction_must_be_text() -> None:
    with pytest.raises(PathError, match="bytes"):
        parse_instruction(b"###a.png###")  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["a ###b.png and nothing else", "###a.png### and ###b.png", "###"])
def test_an_unclosed_marker_is_an_instruction_error(text: str) -> None:
    with pytest.raises(InstructionError, match="never closed"):
        parse_instruction(text)


# --------------------------------------------------------------------------- confinement to allowed roots


@pytest.fixture
def root(tmp_path: Path) -> Path:
    inside = tmp_path / "input"
    (inside / "sub").mkdir(parents=True)
    (inside / "a.png").write_bytes(b"png")
    (inside / "sub" / "b.mp4").write_bytes(b"mp4")
    (tmp_path / "secret.png").write_bytes(b"secret")
    return inside


def _refused(text: str, roots: list[Path], reference: str) -> PathError:
    with pytest.raises(PathError) as err:
        parse_instruction(text, roots, must_exist=True)
    message = str(err.value)
    assert repr(reference) in message
    assert any(str(r.resolve()) in message for r in roots)
    return err.value


def test_files_inside_the_root_resolve(root: Path) -> None:
    instruction = parse_instruction("Animate ###a.png### like ###sub/b.mp4###", [root], must_exist=True)
    assert instruction.resolved == ((root / "a.png").resolve(), (root / "sub" / "b.mp4").resolve())
    assert [m.path for m in instruction.media] == ["a.png", "sub/b.mp4"]


def test_absolute_path_inside_the_root_resolves(root: Path) -> None:
    target = (root / "a.png").resolve()
    instruction = parse_instruction(f"Describe ###{target}###", [root], must_exist=True)
    assert instruction.resolved == (target,)


def test_second_root_is_searched(root: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "c.png").write_bytes(b"png")
    instruction = parse_instruction("###c.png###", [root, other], must_exist=True)
    assert instruction.resolved == ((other / "c.png").resolve(),)


@pytest.mark.parametrize("reference", ["../secret.png", "sub/../../secret.png", "./../secret.png"])
def test_dotdot_escape_is_refused(root: Path, reference: str) -> None:
    _refused(f"Describe ###{reference}###", [root], reference)


def test_absolute_path_outside_is_refused(root: Path, tmp_path: Path) -> None:
    reference = str(tmp_path / "secret.png")
    _refused(f"Describe ###{reference}###", [root], reference)


def test_symlink_pointing_out_is_refused(root: Path, tmp_path: Path) -> None:
    os.symlink(tmp_path / "secret.png", root / "link.png")
    _refused("Describe ###link.png###", [root], "link.png")
    os.symlink(tmp_path, root / "escape")
    _refused("Describe ###escape/secret.png###", [root], "escape/secret.png")


def test_symlink_staying_inside_is_allowed(root: Path) -> None:
    os.symlink(root / "a.png", root / "alias.png")
    instruction = parse_instruction("Describe ###alias.png###", [root], must_exist=True)
    assert instruction.resolved == ((root / "a.png").resolve(),)


def test_missing_file_is_refused_only_when_it_must_exist(root: Path) -> None:
    _refused("Describe ###missing.png###", [root], "missing.png")
    planned = parse_instruction("Describe ###missing.png###", [root], must_exist=False)
    assert planned.resolved == ((root / "missing.png").resolve(),)


def test_a_directory_is_not_a_medium(root: Path) -> None:
    (root / "folder.png").mkdir()
    with pytest.raises(PathError, match=r"'folder\.png'"):
        parse_instruction("Describe ###folder.png###", [root], must_exist=True)


@pytest.mark.parametrize("must_exist", [True, False])
def test_a_name_too_long_for_the_file_system_is_a_path_error(root: Path, must_exist: bool) -> None:
    reference = "a" * 300 + ".png"  # longer than NAME_MAX (255): the OS raises ENAMETOOLONG
    with pytest.raises(PathError) as err:
        parse_instruction(f"Describe ###{reference}###", [root], must_exist=must_exist)
    assert "aaaa" in str(err.value)


def test_no_roots_means_nothing_resolves(root: Path) -> None:
    with pytest.raises(PathError, match="no allowed folder"):
        parse_instruction("Describe ###a.png###", [], must_exist=True)


def test_graph_wired_kinds_are_not_resolved(root: Path) -> None:
    instruction = parse_instruction("Describe ###image_1### and ###a.png###", [root], kinds={"image_1": "image"})
    assert instruction.resolved == ((root / "a.png").resolve(),)


@given(st.text(alphabet=st.sampled_from("ab./\\ .PNG"), max_size=12) | st.text(max_size=12))
def test_media_suffix_is_pathlibs(reference):
    from pathlib import PurePosixPath

    from unison_runtime.instruction import _suffix

    assert _suffix(reference) == PurePosixPath(reference).suffix


@given(st.text(max_size=20))
def test_reference_text_refuses_exactly_the_control_and_disguising_characters(reference):
    import unicodedata

    from unison_runtime.paths import _DISGUISING_CHARACTERS, check_reference_text

    bad = any(unicodedata.category(c) == "Cc" or c in _DISGUISING_CHARACTERS for c in reference)
    if not reference.strip() or bad:
        with pytest.raises(PathError):
            check_reference_text(reference)
    else:
        assert check_reference_text(reference) == reference.strip()
