"""The experiment schema: every shipped experiment loads through `info --config` and `data inspect
--config`, a typo in any section is one line, values parse by type in every section, and the resolved
experiment round-trips through the YAML a run directory keeps."""
import os

import numpy as np
import pytest
from helpers import bilingual_lines, prepared_corpus

from glmjax.cli import main
from glmjax.experiment import ORDER, load_experiment

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
EXPERIMENTS = sorted(os.path.join(ROOT, n) for n in os.listdir(ROOT) if n.endswith(".yaml"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    prepared_corpus(d, bilingual_lines(600, 5), 500)
    return d / "data"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("glmjax: error: ") and len(err.splitlines()) == 1, err
    return err


def test_the_experiments_folder_is_not_empty():
    assert len(EXPERIMENTS) >= 4


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
def test_every_experiment_passes_info_and_data_inspect(path, corpus, tmp_path, capsys):
    assert main(["info", "--config", path]) == 0
    out = capsys.readouterr().out
    for section in ORDER:
        assert f"\n  {section}:" in out, section
    assert "parameters: " in out
    out_npz = tmp_path / "seqs.npz"
    assert main(["data", "inspect", "--config", path, "--num-samples", "2", "--output", str(out_npz),
                 f"data.path={corpus}"]) == 0, capsys.readouterr().err
    exp = load_experiment(path)
    with np.load(out_npz) as z:
        assert z["tokens"].shape == (2, exp.objective.seq_length)
        assert z["position_ids"].shape[1] == (2 if exp.model.position_encoding_2d else exp.objective.seq_length)


def test_glm130b_recipes_carry_the_papers_numbers():
    glm = load_experiment(os.path.join(ROOT, "glm-130b-pretrain-a100.yaml"))
    assert glm.model.num_params() == 128_697_794_560
    assert (glm.optim.lr, glm.optim.min_lr, glm.optim.rampup_batch_size) == (8e-5, 8e-6, (192, 24, 5493164))
    assert (glm.loss_scale.initial, glm.loss_scale.window, glm.loss_scale.hysteresis) == (65536, 2000, 2)
    assert glm.objective.gpt_prob == 0.7 and glm.model.embedding_grad_shrink == 0.1
    assert glm.objective.seq_length == 2048 and glm.optim.global_batch % glm.train.micro_batch == 0


@pytest.mark.parametrize("section", ORDER)
def test_a_typo_in_any_section_is_one_clear_line(section, capsys):
    path = os.path.join(ROOT, "glm-small-cpu.yaml")
    assert main(["info", "--config", path, f"{section}.sead=3"]) == 2
    err = one_error_line(capsys)
    assert "'sead'" in err and ("unknown" in err), err


def test_an_unknown_section_and_a_bad_value_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {preset: glm-test}\ndata: {path: x}\ntrian: {steps: 3}\n")
    assert main(["info", "--config", str(bad)]) == 2
    assert "unknown section 'trian'" in one_error_line(capsys)
    path = os.path.join(ROOT, "glm-small-cpu.yaml")
    for override, msg in (("train.steps=abc", "train.steps must be an integer"),
                          ("optim.lr=.nan", "optim.lr must be a finite number"),
                          ("optim.rampup_batch_size=[1, 2]", "optim.rampup_batch_size must be"),
                          ("model.rotary_base=[1]", "rotary_base must be a finite number")):
        assert main(["info", "--config", path, override]) == 2
        assert msg in one_error_line(capsys), override


def test_numbers_parse_the_same_in_every_notation_and_section():
    path = os.path.join(ROOT, "glm-small-cpu.yaml")
    exp = load_experiment(path, ["optim.lr=1e-3", "optim.min_lr=1E-4", "loss_scale.min_scale=1e-30",
                                 "train.steps=1e2", "layernorm_epsilon=1e-6"], default_section="model")
    assert (exp.optim.lr, exp.optim.min_lr, exp.loss_scale.min_scale) == (1e-3, 1e-4, 1e-30)
    assert exp.train.steps == 100 and isinstance(exp.train.steps, int) and exp.model.layernorm_epsilon == 1e-6


def test_bare_key_value_overrides_mean_model_keys_on_model_commands(capsys):
    path = os.path.join(ROOT, "glm-small-cpu.yaml")
    assert main(["info", "--config", path, "num_layers=3", "optim.lr=0.002"]) == 0
    out = capsys.readouterr().out
    assert "num_layers: 3" in out and "lr: 0.002" in out


def test_the_resolved_experiment_round_trips_through_its_yaml(tmp_path):
    path = os.path.join(ROOT, "glm-130b-pretrain-a100.yaml")
    exp = load_experiment(path, ["model.embedding_grad_shrink=[[0, 0.1], [6000, 0.1], [6500, 1.0]]"])
    again = tmp_path / "experiment.yaml"
    again.write_text(exp.to_yaml())
    assert load_experiment(str(again)) == exp
    assert exp.model.egs_alpha_at(6250) == pytest.approx(0.55)
