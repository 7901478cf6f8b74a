"""Errors a ComfyUI user sees name folders by their role, never by the server's absolute path."""

from __future__ import annotations

import os

import pytest
from harness.fixtures import comfy  # noqa: F401 - fixture

from nodes.planning import UnisonPlanner
from unison_runtime import paths
from unison_runtime.errors import UnisonError


@pytest.mark.parametrize("reference", ["missing.png", "../outside.png", "/etc/hosts.png", "sub/../../x.png"])
def test_planner_errors_name_the_input_folder_by_role(comfy, reference: str) -> None:  # noqa: F811
    instruction = f"Animate ###{reference}### into a 2 second video."
    message = UnisonPlanner.VALIDATE_INPUTS(instruction=instruction)
    assert isinstance(message, str) and "ComfyUI's input folder" in message
    with pytest.raises(UnisonError) as caught:
        UnisonPlanner().run(instruction)
    for text in (message, str(caught.value)):
        assert str(comfy.base) not in text and os.path.realpath(comfy.base) not in text, text


def test_a_file_that_is_not_regular_is_shown_inside_the_folder(comfy) -> None:  # noqa: F811
    (comfy.input / "clips").mkdir()
    (comfy.input / "clips" / "cat.png").mkdir()  # a folder where a file was expected
    message = UnisonPlanner.VALIDATE_INPUTS(instruction="Animate ###clips/cat.png###.")
    assert "(ComfyUI's input folder/clips/cat.png)" in message and str(comfy.base) not in message


def test_unnamed_folders_are_shown_as_they_are(tmp_path) -> None:
    assert paths.shown(tmp_path / "a.png") == str(tmp_path / "a.png")
    paths.name_folder(tmp_path, "the test folder")
    assert paths.shown(tmp_path / "sub" / "a.png") == "the test folder/sub/a.png"
    assert paths.shown(tmp_path) == "the test folder"
