"""README snippets the tests run: a python block right under `<!-- snippet: NAME -->` in README.md."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parent.parent / "README.md"


def snippet(name: str) -> str:
    """The code of README's snippet NAME (the ```python block right after its marker)."""
    text = README.read_text()
    found = re.search(rf"<!-- snippet: {re.escape(name)} -->\n```python\n(.*?)\n```", text, re.S)
    assert found, f"README.md has no python block under <!-- snippet: {name} -->"
    return found.group(1)


def run_snippet(name: str, **namespace: Any) -> dict[str, Any]:
    """Run README's snippet NAME with `namespace` as its globals (the variables the README says you bring: model,
    args, train, ...); returns the namespace after it ran, so the test can read back what it made."""
    ns: dict[str, Any] = {"__name__": f"readme_{name}", **namespace}
    exec(compile(snippet(name), f"README.md:{name}", "exec"), ns)
    return ns
