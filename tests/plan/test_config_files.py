"""Config files read strictly (kolors_story.plan.config_files): syntax errors name file, line and
column; a key given twice is refused naming both lines, in config.yaml and in a --configfile."""

from __future__ import annotations

import pytest

from kolors_story.errors import UserError
from kolors_story.plan import config_files
from workflow_copy import snakemake


def test_a_key_given_twice_names_both_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 10\n  rank: 4\n  steps: 30\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"c.yaml, line 4, column 3: key 'steps' is given twice .*first on line 2"):
        config_files.load_strict(path)


def test_the_same_key_in_two_mappings_is_fine(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {steps: 1}\ngenerate: {steps: 2}\nbase: &b {x: 1}\nmore: {<<: *b, y: 2}\n")
    assert config_files.load_strict(path)["more"] == {"x": 1, "y": 2}


@pytest.mark.parametrize("text,where", [("train:\n  steps: 10\n rank: 4\n", "line 3, column 2"),
                                        ("story:\n  title: \"unclosed\n", "line 3, column 1"),
                                        ("a: [1, 2\n", "line 2, column 1")])
def test_a_syntax_error_names_file_line_and_column(tmp_path, where, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=f"bad.yaml, {where}: not valid YAML"):
        config_files.load_strict(path)
    assert config_files.main([str(path)]) == 1


def test_the_check_command_passes_the_shipped_configs(capsys):
    assert config_files.main(["config.yaml", "demo/config.yaml", "demo/sweep.yaml"]) == 0
    assert "3 config file(s) read strictly" in capsys.readouterr().out


def test_the_workflow_refuses_a_duplicate_key_in_a_configfile_and_a_syntax_error_in_config_yaml(tmp_path):
    (tmp_path / "extra.yaml").write_text("train:\n  steps: 10\n  steps: 30\n", encoding="utf-8")
    dup = snakemake(tmp_path, "-n", "--configfile", "demo/config.yaml", "extra.yaml")
    assert dup.returncode != 0 and "extra.yaml, line 3, column 3: key 'steps' is given twice" in dup.stdout + dup.stderr
    config = tmp_path / "config.yaml"
    config.write_text(config.read_text(encoding="utf-8") + "\ntrain:\n steps: [\n", encoding="utf-8")
    bad = snakemake(tmp_path, "-n")
    assert bad.returncode != 0 and "config.yaml, line" in bad.stdout + bad.stderr and "not valid YAML" in bad.stdout + bad.stderr
