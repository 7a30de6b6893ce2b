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


def test_readme_training_examples_after_the_first_write_their_own_run_dir():
    """After the main command has filled runs/tiny, an example that resumed it would only say the
    run is complete: each later training example names its own train.output_dir."""
    commands = re.findall(r"```bash\n(.*?)\n```", readme(), flags=re.S)
    lines = "\n".join(commands[2:]).replace("\\\n", " ").splitlines()
    examples = [line for line in lines if re.search(r"trainer\.train configs/tiny\.yaml", line)]
    assert examples
    dirs = [re.search(r"train\.output_dir=(\S+)", line) for line in examples]
    assert all(dirs), [line for line, d in zip(examples, dirs) if not d]
    names = [d.group(1) for d in dirs]
    assert "runs/tiny" not in names and len(set(names)) == len(names)
