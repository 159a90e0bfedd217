"""User-facing configuration of the flashfuse backend, with validation that names the bad key."""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Iterable, Mapping

REMAINDERS = ("inductor", "eager")
FP32_PRECISIONS = ("tf32", "ieee")
NORM_POLICIES = ("auto", "always", "never")


@dataclasses.dataclass(frozen=True)
class Config:
    """How flashfuse compiles a graph.

    remainder:       what compiles everything flashfuse did not fuse: ``"inductor"`` (default) or
                     ``"eager"`` (a pure mode: the rewritten graph runs op by op, only flashfuse's
                     kernels are added).
    passes:          names of the rewrite passes to run, in order; ``None`` runs every default pass.
    disable:         names of passes to skip.
    fp32_precision:  fp32 attention inputs are multiplied in ``"tf32"`` (default) or ``"ieee"``.
    norm_policy:     under Inductor, replace norm/pointwise fusions ``"auto"`` (where flashfuse's kernel
                     was measured faster), ``"always"`` or ``"never"``; under eager they always apply.
    """

    remainder: str = "inductor"
    passes: tuple[str, ...] | None = None
    disable: tuple[str, ...] = ()
    fp32_precision: str = "tf32"
    norm_policy: str = "auto"

    def __post_init__(self) -> None:
        _check_choice("remainder", self.remainder, REMAINDERS)
        _check_choice("fp32_precision", self.fp32_precision, FP32_PRECISIONS)
        _check_choice("norm_policy", self.norm_policy, NORM_POLICIES)
        from flashfuse.passes import known_pass_names

        known = known_pass_names()
        for name in (self.passes or ()) + tuple(self.disable):
            _check_choice("pass name", name, known)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None, **overrides: Any) -> "Config":
        """Build from ``torch.compile(..., options={...})`` and/or keyword overrides."""
        merged = dict(options or {})
        merged.update(overrides)
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in merged:
            if key not in fields:
                hint = difflib.get_close_matches(key, fields, n=1)
                extra = f"; did you mean {hint[0]!r}?" if hint else ""
                raise ValueError(
                    f"flashfuse: unknown option {key!r}{extra} Known options: {sorted(fields)}"
                )
        for key in ("passes", "disable"):
            if key in merged and merged[key] is not None:
                merged[key] = _as_names(key, merged[key])
        return cls(**merged)

    def enabled_passes(self) -> list[str]:
        from flashfuse.passes import default_pass_names

        names = list(self.passes) if self.passes is not None else default_pass_names()
        return [n for n in names if n not in self.disable]


def _as_names(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable):
        names = tuple(value)
        if all(isinstance(n, str) for n in names):
            return names
    raise TypeError(f"flashfuse: option {key!r} takes a pass name or a list of them, got {value!r}")


def _check_choice(what: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        hint = difflib.get_close_matches(str(value), choices, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"flashfuse: unknown {what} {value!r}{extra}; expected one of {list(choices)}")
