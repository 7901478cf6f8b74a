"""The interface every planner shares, so nodes, the CLI and the pipeline can use any of them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..instruction import Instruction
    from ..media import Medium
    from ..plan import Plan


@runtime_checkable
class Planner(Protocol):
    """Stage one: decide the plan; answer understanding tasks; give hidden states to the projector.

    ``answer`` and ``hidden_states`` return ``None`` when the planner has no model behind it
    (the rule planner): the caller then has no answer text and no projector input.
    """

    name: str

    def plan(self, instruction: Instruction) -> Plan:
        """The validated plan for ``instruction`` (roles assigned to its media)."""
        ...

    def answer(self, instruction: Instruction, media: Sequence[Medium]) -> str | None:
        """The answer to an understanding instruction, seeing every referenced medium."""
        ...

    def hidden_states(self, instruction: Instruction) -> Any | None:
        """Last hidden states of the planning prompt, first token dropped: a ``[1, L, hidden]`` tensor."""
        ...
