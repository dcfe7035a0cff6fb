"""Render the hook reference (docs/hooks.md) from the hook specifications.

``python -m llmgateway.core.hookdoc > docs/hooks.md``; a meta-test fails when the file is stale.
"""

from __future__ import annotations

import inspect

from . import hookspecs


def render() -> str:
    lines = ["# Hook reference", "", "Generated from `core/hookspecs.py` by `python -m llmgateway.core.hookdoc`.", ""]
    lines += [inspect.getdoc(hookspecs) or "", ""]
    for name in hookspecs.all_hook_names():
        spec = hookspecs.describe(name)
        mode = "first-result" if spec["firstresult"] else "fan-out"
        kind = "request (may be async)" if name in hookspecs.REQUEST_HOOKS else "lifecycle"
        lines += [f"### `{name}`", "", f"`{name}{spec['signature']}`", "", f"*{kind}, {mode}*", "", spec["doc"], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
