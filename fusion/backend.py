"""The torch.compile backend. Registered as "flashfuse" through the torch_dynamo_backends entry point."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch.fx as fx

from flashfuse.config import Config


def flashfuse_backend(gm: fx.GraphModule, example_inputs: list, *, options: Mapping[str, Any] | None = None,
                      mode: str | None = None) -> Callable:
    """`torch.compile(model, backend="flashfuse", options={...}, mode=...)` lands here."""
    import flashfuse.kernels  # noqa: F401  (registers the flashfuse:: ops)
    from flashfuse.pipeline import compile_graph

    return compile_graph(gm, example_inputs, Config.from_options(options), mode=mode)


class Backend:
    """A configured backend: `torch.compile(model, backend=flashfuse.backend(remainder="eager"))`."""

    def __init__(self, config: Config | None = None, **options: Any) -> None:
        self.config = Config.from_options(options) if config is None else config
        self.__name__ = "flashfuse"

    def __call__(self, gm: fx.GraphModule, example_inputs: list, *, options: Mapping[str, Any] | None = None,
                 mode: str | None = None) -> Callable:
        import flashfuse.kernels  # noqa: F401
        from flashfuse.pipeline import compile_graph

        config = self.config
        if options:
            import dataclasses

            config = Config.from_options({**dataclasses.asdict(config), **options})
        return compile_graph(gm, example_inputs, config, mode=mode)

    def __eq__(self, other: object) -> bool:  # lets Dynamo reuse compiled code for equal configs
        return isinstance(other, Backend) and other.config == self.config

    def __hash__(self) -> int:
        return hash(self.config)

    def __repr__(self) -> str:
        return f"flashfuse.backend({self.config})"


def backend(**options: Any) -> Backend:
    """A flashfuse backend with options, e.g. `flashfuse.backend(remainder="eager", disable=["attention"])`."""
    return Backend(**options)
