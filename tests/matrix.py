"""The reliability matrix: every bad input and fault the tests try, one `Case` each.

Test modules declare their cases in a module-level `MATRIX` list and parametrize their tests
over it, so a row exists only where a test asserts it. `python tests/matrix.py` prints the
README's reliability table from them; `tests/test_readme.py` checks the README holds exactly it.
"""

import dataclasses
import importlib
import sys
from pathlib import Path

# Modules holding MATRIX lists, in the table's order.
MODULES = ("test_bad_output", "test_bad_data", "test_bad_weights", "test_bad_images", "test_reliability",
           "test_faults")


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str  # the table's group: "output dir", "shards", "sample", "weights", "images", "fault"
    what: str  # what was tried, as a user would say it
    sees: str  # what the user sees: the asserted fragment of the one-line error, or the outcome
    exit: str = "2"  # the asserted exit status ("2", "0", "1", "—" for per-sample cases the run survives)
    lost: str = "nothing"  # what the test checks was kept: "nothing", "resume bit-exact", ...

    @property
    def id(self) -> str:
        return f"{self.kind}: {self.what}"


def collect() -> list[Case]:
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    cases = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        cases += getattr(module, "MATRIX", [])
    return cases


def table(cases: list[Case]) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|")

    rows = ["| input or fault | what the user sees | exit | lost |", "|---|---|---|---|"]
    rows += [f"| {cell(c.kind)}: {cell(c.what)} | {cell(c.sees)} | {c.exit} | {cell(c.lost)} |" for c in cases]
    kinds = dict.fromkeys(c.kind for c in cases)
    counts = ", ".join(f"{sum(c.kind == k for c in cases)} {k}" for k in kinds)
    rows.append(f"| **all** | {len(cases)} cases: {counts} | | |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(collect()))
