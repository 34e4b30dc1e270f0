"""The README's run-config reference lists exactly the sections and keys the validator accepts."""

import re
from pathlib import Path

import pytest

from e2evlp.train.run_config import RunConfigError, load_run_config, schema

README = Path(__file__).resolve().parents[1] / "README.md"
HEADER = re.compile(r"^\|\s*section\s*\|\s*keys\s*\|")


def config_reference(text: str) -> dict[str, set[str]]:
    """{section: keys} from the README table headed ``| section | keys | ...``: the section is the first cell's
    backticked name, the keys every backticked name of the second cell."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if HEADER.match(line)), None)
    assert start is not None, "README.md has no table headed '| section | keys |'"
    reference = {}
    for line in lines[start + 2:]:  # past the header and its |---| row
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        section = re.fullmatch(r"`([^`]+)`", cells[0])
        assert section, f"the first cell of {line!r} is not one `section`"
        assert section[1] not in reference, f"section {section[1]} is listed twice"
        reference[section[1]] = set(re.findall(r"`([^`]+)`", cells[1]))
    return reference


def differences(reference: dict[str, set[str]], accepted: dict[str, tuple[str, ...]]) -> list[str]:
    """What the README lists that the validator rejects, and what it accepts that the README leaves out."""
    problems = [f"section {name!r}: in the README, not accepted" for name in sorted(set(reference) - set(accepted))]
    problems += [f"section {name!r}: accepted, not in the README" for name in sorted(set(accepted) - set(reference))]
    for name in sorted(set(reference) & set(accepted)):
        listed, keys = reference[name], set(accepted[name])
        problems += [f"{name}.{key}: in the README, rejected" for key in sorted(listed - keys)]
        problems += [f"{name}.{key}: accepted, not in the README" for key in sorted(keys - listed)]
    return problems


def test_readme_config_reference_matches_the_validator():
    assert differences(config_reference(README.read_text()), schema()) == []


def test_the_reference_parser_sees_both_directions():
    text = "| section | keys | notes |\n|---|---|---|\n| `data` | `train`, `test_splits` | x |\n\nafter\n"
    assert config_reference(text) == {"data": {"train", "test_splits"}}
    assert differences(config_reference(text), {"data": ("train", "val"), "eval": ("num_beams",)}) == [
        "section 'eval': accepted, not in the README", "data.test_splits: in the README, rejected",
        "data.val: accepted, not in the README"]


@pytest.mark.parametrize("section", ["model", "data", "data.image", "train", "eval"])
def test_the_schema_is_what_validate_enforces(section):
    accepted = schema()[section]
    prefix = section.split(".")
    for key in accepted:
        if (section, key) != ("model", "preset"):  # null is not a preset (the value is checked there)
            load_run_config(None, [f"{'.'.join([*prefix, key])}=null"])
    with pytest.raises(RunConfigError, match=r"unknown key\(s\) \['not_a_key'\]"):
        load_run_config(None, [f"{'.'.join([*prefix, 'not_a_key'])}=1"])
