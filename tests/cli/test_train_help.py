"""`rwkvctl train --help` shows each config option's field docstring (rwkvctl/train/config.py): one text."""

from __future__ import annotations

import typer.main

from rwkvctl.cli import app
from rwkvctl.cli.train import CONFIG_FLAGS
from rwkvctl.train.config import RunConfig, field_docs

# train options that set no single config field (a file, a whole model section, any key, where to resume)
NOT_CONFIG_FIELDS = {"config", "preset", "set_", "resume", "resume_step"}


def _train_options() -> dict[str, object]:
    return {p.name: p for p in typer.main.get_command(app).commands["train"].params}


def test_every_config_option_shows_its_field_doc():
    docs, options = field_docs(), _train_options()
    for param, key in CONFIG_FLAGS.items():
        assert key in docs, f"--{param}: {key} has no docstring in the run config"
        assert options[param].help == docs[key], f"--{param} does not show the doc of {key}"


def test_no_train_option_is_left_out():
    """A new option either maps to a config field (and shows its doc) or is listed here as not being one."""
    assert set(_train_options()) == set(CONFIG_FLAGS) | NOT_CONFIG_FIELDS


def test_every_mapped_key_is_a_real_override():
    cfg = RunConfig()
    for key in CONFIG_FLAGS.values():
        section, _, name = key.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, name)
        assert cfg.with_overrides({key: value}).to_dict() == cfg.to_dict(), key


def test_field_docs_read_multiline_docstrings_as_one_line():
    doc = field_docs()["train.segment_len"]
    assert "\n" not in doc and "  " not in doc and doc.endswith("Any strategy.")
    assert field_docs()["model.n_layer"] == "Number of blocks."  # rwkvctl/config.py's ModelConfig too
