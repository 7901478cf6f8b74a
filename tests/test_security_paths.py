"""Hostile media references: every one either resolves inside the allowed folder or is refused.

The hostile inputs are real: symlinks out of the folder, a FIFO, a socket, a link to /dev/zero,
a symlink loop, files swapped for links between the check and the open.
"""

from __future__ import annotations

import os
import socket
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unison_runtime.errors import PathError
from unison_runtime.instruction import parse_instruction
from unison_runtime.paths import (
    MAX_REFERENCE_LENGTH,
    check_reference_text,
    open_reference,
    open_regular_file,
    open_within,
    resolve_reference,
)


@pytest.fixture()
def tree(tmp_path: Path) -> dict[str, Path]:
    """root/ (the allowed folder) beside outside/ (a secret), with links both ways."""
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "photo.png").write_bytes(b"photo")
    (root / "sub" / "inner.png").write_bytes(b"inner")
    (outside / "secret.png").write_bytes(b"secret")
    (root / "link_out.png").symlink_to(outside / "secret.png")
    (root / "dirlink").symlink_to(outside, target_is_directory=True)
    (root / "link_in.png").symlink_to(root / "photo.png")
    return {"root": root, "outside": outside}


def _refused(reference: str, roots: list[Path], *fragments: str, **kwargs: object) -> str:
    with pytest.raises(PathError) as info:
        resolve_reference(reference, roots, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


# --------------------------------------------------------------------------- what is allowed


def test_plain_and_nested_names_resolve_to_the_real_file(tree: dict[str, Path]) -> None:
    root = tree["root"]
    assert resolve_reference("photo.png", [root]) == root / "photo.png"
    assert resolve_reference("sub/inner.png", [root]) == root / "sub" / "inner.png"
    assert resolve_reference("  photo.png  ", [root]) == root / "photo.png"
    assert resolve_reference("./sub/./inner.png", [root]) == root / "sub" / "inner.png"


def test_backslash_is_a_separator_on_every_os(tree: dict[str, Path]) -> None:
    assert resolve_reference("sub\\inner.png", [tree["root"]]) == tree["root"] / "sub" / "inner.png"


def test_trailing_slash_names_the_same_file(tree: dict[str, Path]) -> None:
    assert resolve_reference("photo.png/", [tree["root"]]) == tree["root"] / "photo.png"


def test_absolute_path_inside_the_root_is_allowed(tree: dict[str, Path]) -> None:
    path = tree["root"] / "sub" / "inner.png"
    assert resolve_reference(str(path), [tree["root"]]) == path


def test_symlink_inside_the_root_is_followed_to_its_target(tree: dict[str, Path]) -> None:
    assert resolve_reference("link_in.png", [tree["root"]]) == tree["root"] / "photo.png"


def test_root_that_is_itself_a_symlink_works(tree: dict[str, Path], tmp_path: Path) -> None:
    linked_root = tmp_path / "linked_root"
    linked_root.symlink_to(tree["root"], target_is_directory=True)
    assert resolve_reference("photo.png", [linked_root]) == tree["root"] / "photo.png"
    # An absolute reference spelled through the link is inside too.
    assert resolve_reference(str(linked_root / "photo.png"), [linked_root]) == tree["root"] / "photo.png"


def test_second_root_is_searched(tree: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "clip.mp4").write_bytes(b"x")
    assert resolve_reference("clip.mp4", [tree["root"], other]) == other / "clip.mp4"


def test_first_root_holding_the_name_decides(tree: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "photo.png").symlink_to(tree["outside"] / "secret.png")
    assert resolve_reference("photo.png", [tree["root"], other]) == tree["root"] / "photo.png"
    # The other way round the name is found first as a link out, which is refused, not skipped.
    _refused("photo.png", [other, tree["root"]], "outside the allowed folder")


def test_missing_file_is_allowed_only_for_planning(tree: dict[str, Path]) -> None:
    root = tree["root"]
    assert resolve_reference("later.png", [root], must_exist=False) == root / "later.png"
    _refused("later.png", [root], "'later.png'", "was not found", str(root))


def test_case_follows_the_file_system(tree: dict[str, Path]) -> None:
    """On a case-sensitive file system PHOTO.PNG is another (missing) file, never a way around a check."""
    probe = tree["root"] / "PHOTO.PNG"
    if probe.exists():  # case-insensitive file system: same file, still inside
        assert resolve_reference("PHOTO.PNG", [tree["root"]]).parent == tree["root"]
    else:
        _refused("PHOTO.PNG", [tree["root"]], "was not found")


# --------------------------------------------------------------------------- traversal and escapes


@pytest.mark.parametrize(
    "reference",
    ["../outside/secret.png", "sub/../../outside/secret.png", "sub/../photo.png", "..", "..\\outside\\secret.png",
     "sub\\..\\..\\outside\\secret.png", "./../outside/secret.png"],
)
def test_dot_dot_is_refused_even_when_it_would_stay_inside(tree: dict[str, Path], reference: str) -> None:
    _refused(reference, [tree["root"]], repr(reference), "'..'", str(tree["root"]))


def test_absolute_path_elsewhere_is_refused(tree: dict[str, Path]) -> None:
    secret = str(tree["outside"] / "secret.png")
    _refused(secret, [tree["root"]], repr(secret), "outside the allowed folder", str(tree["root"]))
    _refused("/etc/passwd", [tree["root"]], "outside the allowed folder")


def test_sibling_folder_sharing_the_roots_name_prefix_is_outside(tmp_path: Path) -> None:
    """``/x/input_evil/a.png`` starts with the text ``/x/input`` but is not inside ``/x/input``."""
    root, evil = tmp_path / "input", tmp_path / "input_evil"
    root.mkdir()
    evil.mkdir()
    (evil / "a.png").write_bytes(b"x")
    _refused(str(evil / "a.png"), [root], "outside the allowed folder")


@pytest.mark.parametrize("reference", ["C:\\Users\\me\\photo.png", "C:/photo.png", "\\\\server\\share\\photo.png"])
def test_windows_absolute_paths_are_refused_on_posix(tree: dict[str, Path], reference: str) -> None:
    if os.name == "nt":
        _refused(reference, [tree["root"]], "outside the allowed folder")
    else:
        _refused(reference, [tree["root"]], "Windows path", str(tree["root"]))


def test_symlink_pointing_out_is_refused(tree: dict[str, Path]) -> None:
    _refused("link_out.png", [tree["root"]], "'link_out.png'", "outside the allowed folder", str(tree["root"]))


def test_symlinked_folder_pointing_out_is_refused(tree: dict[str, Path]) -> None:
    _refused("dirlink/secret.png", [tree["root"]], "outside the allowed folder")


def test_dangling_symlink_out_is_refused_even_for_planning(tree: dict[str, Path], tmp_path: Path) -> None:
    (tree["root"] / "later_out.png").symlink_to(tmp_path / "nowhere" / "x.png")
    _refused("later_out.png", [tree["root"]], "outside the allowed folder", must_exist=False)


def test_symlink_loop_is_a_clear_error(tree: dict[str, Path]) -> None:
    root = tree["root"]
    (root / "loop_a.png").symlink_to(root / "loop_b.png")
    (root / "loop_b.png").symlink_to(root / "loop_a.png")
    _refused("loop_a.png", [root], "'loop_a.png'", "cannot be used")


def test_overlong_component_is_a_clear_error(tree: dict[str, Path]) -> None:
    _refused("a" * 300 + ".png", [tree["root"]], "cannot be used")


# --------------------------------------------------------------------------- files that are not files


def test_device_via_symlink_in_the_root_is_refused(tree: dict[str, Path]) -> None:
    (tree["root"] / "zero.png").symlink_to("/dev/zero")
    _refused("zero.png", [tree["root"]], "outside the allowed folder")
    # A link may not hop into another allowed folder either: it must stay in the one it was found in.
    _refused("zero.png", [tree["root"], Path("/dev")], "outside the allowed folder")
    # Even if /dev itself were an allowed folder, a device is not a regular file.
    _refused("zero", [Path("/dev")], "'zero'", "character device")


def test_fifo_in_the_root_is_refused_without_blocking(tree: dict[str, Path]) -> None:
    os.mkfifo(tree["root"] / "pipe.mp4")
    _refused("pipe.mp4", [tree["root"]], "'pipe.mp4'", "named pipe (FIFO)")
    with pytest.raises(PathError, match="named pipe"):
        open_regular_file(tree["root"] / "pipe.mp4")  # O_NONBLOCK: returns at once, no writer needed


def test_socket_in_the_root_is_refused(tree: dict[str, Path]) -> None:
    path = tree["root"] / "sock.png"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(path))
        _refused("sock.png", [tree["root"]], "a socket")
    finally:
        server.close()


@pytest.mark.parametrize("reference", ["sub", ".", "sub/", "./"])
def test_folders_are_refused(tree: dict[str, Path], reference: str) -> None:
    _refused(reference, [tree["root"]], "a folder")


def test_open_regular_file_refuses_devices(tree: dict[str, Path]) -> None:
    with pytest.raises(PathError, match="character device"):
        open_regular_file("/dev/zero")


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("reference", "code"),
    [("a\x00b.png", "U+0000"), ("a\nb.png", "U+000A"), ("\x1b[31mred.png", "U+001B"), ("del\x7f.png", "U+007F"),
     ("c1\x85.png", "U+0085"), ("photo\u202egnp.exe", "U+202E"), ("tab\there.png", "U+0009")],
)
def test_control_and_disguising_characters_are_refused(tree: dict[str, Path], reference: str, code: str) -> None:
    _refused(reference, [tree["root"]], code, "control or invisible")


@pytest.mark.parametrize("reference", ["", "   ", "\t"])
def test_empty_references_are_refused(reference: str) -> None:
    with pytest.raises(PathError):
        check_reference_text(reference)


def test_non_text_and_overlong_references_are_refused(tree: dict[str, Path]) -> None:
    with pytest.raises(PathError, match="must be text"):
        resolve_reference(b"photo.png", [tree["root"]])  # type: ignore[arg-type]
    _refused("a" * (MAX_REFERENCE_LENGTH + 1), [tree["root"]], f"at most {MAX_REFERENCE_LENGTH}")


def test_no_root_configured_is_refused() -> None:
    with pytest.raises(PathError, match="no allowed folder"):
        resolve_reference("photo.png", [])


def test_what_names_the_kind_of_reference(tree: dict[str, Path]) -> None:
    _refused("../x.safetensors", [tree["root"]], "model file '../x.safetensors'", what="model file")


def test_instruction_references_go_through_the_same_rules(tree: dict[str, Path]) -> None:
    with pytest.raises(PathError, match=r"'\.\.'"):
        parse_instruction("edit ###../outside/secret.png### please", roots=[tree["root"]])
    with pytest.raises(PathError, match="outside the allowed folder"):
        parse_instruction("edit ###link_out.png###", roots=[tree["root"]])
    parsed = parse_instruction("edit ###sub/inner.png###", roots=[tree["root"]], must_exist=True)
    assert parsed.resolved == (tree["root"] / "sub" / "inner.png",)


# --------------------------------------------------------------------------- check-then-open gap


def test_open_reference_reads_the_checked_file(tree: dict[str, Path]) -> None:
    with open_reference("sub/inner.png", [tree["root"]]) as fh:
        assert fh.read() == b"inner"
    with pytest.raises(PathError, match="outside the allowed folder"):
        open_reference("link_out.png", [tree["root"]])


def test_folder_swapped_for_a_symlink_after_the_check_is_not_followed(tree: dict[str, Path]) -> None:
    root, outside = tree["root"], tree["outside"]
    checked = resolve_reference("sub/inner.png", [root])
    (outside / "inner.png").write_bytes(b"stolen")
    (root / "sub").rename(root / "sub_moved")
    (root / "sub").symlink_to(outside, target_is_directory=True)  # the attacker's swap
    assert checked.read_bytes() == b"stolen"  # a plain open would now read outside
    with pytest.raises(PathError, match="changed while it was being opened"):
        open_within(checked, root)


def test_file_swapped_for_a_symlink_after_the_check_is_not_followed(tree: dict[str, Path]) -> None:
    root = tree["root"]
    checked = resolve_reference("photo.png", [root])
    checked.unlink()
    checked.symlink_to(tree["outside"] / "secret.png")
    with pytest.raises(PathError, match="changed while it was being opened"):
        open_within(checked, root)


def test_file_swapped_for_a_fifo_after_the_check_does_not_block(tree: dict[str, Path]) -> None:
    root = tree["root"]
    checked = resolve_reference("photo.png", [root])
    checked.unlink()
    os.mkfifo(checked)
    with pytest.raises(PathError, match="named pipe"):
        open_within(checked, root)


def test_open_within_refuses_paths_outside_its_root(tree: dict[str, Path]) -> None:
    with pytest.raises(PathError, match="not a file inside"):
        open_within(tree["outside"] / "secret.png", tree["root"])
    with pytest.raises(PathError, match="not a file inside"):
        open_within(tree["root"], tree["root"])


# --------------------------------------------------------------------------- property


_SEGMENTS = st.sampled_from(["..", ".", "", "photo.png", "sub", "inner.png", "dirlink", "link_out.png", "secret.png",
                             "link_in.png", "x"])
_SEPARATORS = st.sampled_from(["/", "\\", "//"])


@st.composite
def _references(draw: st.DrawFn) -> str:
    parts = draw(st.lists(_SEGMENTS, min_size=1, max_size=6))
    seps = draw(st.lists(_SEPARATORS, min_size=len(parts), max_size=len(parts)))
    text = "".join(p + s for p, s in zip(parts, seps, strict=True))[: -len(seps[-1])] or parts[0]
    prefix = draw(st.sampled_from(["", "/", "~/", "C:", " "]))
    noise = draw(st.text(alphabet=string.printable, max_size=3))
    return prefix + text + noise


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reference=_references(), must_exist=st.booleans())
def test_any_reference_resolves_inside_the_root_or_is_refused(
    tree: dict[str, Path], reference: str, must_exist: bool
) -> None:
    root = tree["root"].resolve()
    try:
        result = resolve_reference(reference, [root], must_exist=must_exist)
    except PathError:
        return
    assert result == Path(os.path.realpath(result)), "the result must contain no symlink"
    assert result.is_relative_to(root), f"{reference!r} escaped to {result}"
    assert tree["outside"].resolve() not in result.parents
    if must_exist:
        assert result.is_file()
