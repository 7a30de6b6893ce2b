"""The README's promises: its two commands come first, and its config reference is current."""
import os
import re

from trainer.config_reference import BEGIN, END, reference_markdown

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def readme():
    return open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def test_config_reference_is_current():
    text = readme()
    block = text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip()
    assert block == reference_markdown().strip(), "run: python -m trainer.config_reference --update"


def test_readme_opens_with_the_train_and_test_commands_and_ci_runs_the_test_one():
    commands = re.findall(r"```bash\n(.*?)\n```", readme(), flags=re.S)
    assert "python -m trainer.train configs/tiny.yaml" in commands[0]
    assert "pytest" in commands[1]
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert commands[1] in ci.splitlines(), ".ci/run must run the README's test command verbatim"
