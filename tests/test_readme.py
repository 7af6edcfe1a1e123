"""The README documents what the code does: every TensorBoard tag, every MonitorConfig field."""

from dataclasses import fields
from pathlib import Path

from memwatch import AlertConfig, MonitorConfig
from memwatch.reporters.tensorboard import tag_table

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_tag_table_is_current():
    block = README.split("<!-- tags:begin -->\n", 1)[1].split("\n<!-- tags:end -->", 1)[0]
    assert block.strip() == tag_table().strip()


def test_every_config_field_is_documented():
    missing = [
        f.name for cls in (MonitorConfig, AlertConfig) for f in fields(cls) if f"`{f.name}`" not in README
    ]
    assert not missing, missing


def test_readme_opens_with_the_two_commands():
    head = README.split("## ", 1)[0]
    assert "pip install . && memwatch demo" in head
    assert '<!-- ci:test -->\n```bash\npip install -e ".[test]" && pytest' in head
