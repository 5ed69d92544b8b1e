"""params.yaml validation: every bad value stops a stage with exit 2, naming the key, writing nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmat.config import ParamsError, as_dict, flatten, load_params, parse_params
from dmat.profiles import load_profile
from tests.conftest import REPO_ROOT, run_dmat, write_params


def test_committed_params_validate() -> None:
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.data.val_size == 1024
    assert params.base.device in ("auto", "cpu", "cuda")


def test_empty_sections_take_defaults() -> None:
    params = parse_params({})
    assert params.base.seed == 0 and params.data.source == "auto" and params.data.resize is None


def test_fractions_and_tuples_parse() -> None:
    params = parse_params({"data": {"resize": [32, 24], "classes": ["a", "b"]}})
    assert params.data.resize == (32, 24) and params.data.classes == ("a", "b")


def test_flatten_for_mlflow() -> None:
    flat = flatten({"data": as_dict(parse_params({}).data)})
    assert flat["data.val_size"] == 1024 and "data.path" in flat


BAD_VALUES = [
    # (yaml mapping, key the message must name, fragment of what is allowed)
    ({"data": {"val_size": -5}}, "data.val_size", ">= 0"),
    ({"data": {"val_size": "many"}}, "data.val_size", "an integer"),
    ({"data": {"val_size": 3.5}}, "data.val_size", "an integer"),
    ({"base": {"seed": True}}, "base.seed", "an integer"),
    ({"base": {"device": "tpu"}}, "base.device", "auto, cpu, cuda"),
    ({"base": {"threads": 5000}}, "base.threads", "between 0 and 1024"),
    ({"data": {"source": "s3"}}, "data.source", "auto, imagefolder, npz, torchvision"),
    ({"data": {"train_limit": 0}}, "data.train_limit", ">= 1"),
    ({"data": {"resize": [32]}}, "data.resize", "list of 2"),
    ({"data": {"resize": [32, -1]}}, "data.resize[1]", "between 1 and 4096"),
    ({"data": {"resize": "32x32"}}, "data.resize", "a list"),
    ({"data": {"val_sizee": 10}}, "data.val_sizee", "not a known key"),
    ({"datta": {}}, "datta", "not a known key"),
    ({"data": [1, 2]}, "data", "a mapping"),
    ({"data": {"path": None}}, "data.path", "null is not allowed"),
    ({"data": {"name": "CIFAR 10!"}}, "data.name", "matching"),
    ({"data": {"source": "torchvision", "name": "mnist"}}, "data.name", "cifar10, cifar100, svhn"),
    ({"base": {"experiment": ""}}, "base.experiment", "matching"),
    ({"base": {"precision": "fp8"}}, "base.precision", "auto, fp32, bf16, fp16"),
    ({"base": {"memory_format": "nhwc"}}, "base.memory_format", "auto, contiguous, channels_last"),
    ({"base": {"compile": "yes"}}, "base.compile", "true or false"),
    ({"train": {"amp": "bf16"}}, "train.amp", "not a known key"),  # replaced by base.precision
]


@pytest.mark.parametrize(("raw", "key", "allowed"), BAD_VALUES, ids=[case[1] + ":" + str(case[0])[:40]
                                                                   for case in BAD_VALUES])
def test_bad_value_names_key_value_and_what_is_allowed(raw: dict, key: str, allowed: str) -> None:
    with pytest.raises(ParamsError) as caught:
        parse_params(raw)
    message = str(caught.value)
    assert key in message and allowed in message
    assert "\n" not in message


@pytest.mark.parametrize("text", ["data: {val_size: [unclosed", "- just\n- a list\n"])
def test_malformed_yaml_is_a_params_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(ParamsError, match="params.yaml"):
        load_params(write_params(tmp_path / "params.yaml", text))


def test_missing_params_file(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_cli_exits_2_before_writing_anything(tmp_path: Path, image_archive: Path) -> None:
    bad = write_params(tmp_path / "bad.yaml", f"data:\n  path: {image_archive}\n  val_size: -3\n")
    result = run_dmat("prepare", "--params", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert "data.val_size" in result.stderr and "-3" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "folder", "tiny.tar.gz"]


def test_paper_profile_is_the_reference_recipe() -> None:
    params, _ = load_profile("profiles/paper-cifar10.yaml", REPO_ROOT)
    assert params.train_diffusion.model == "ddpmpp-cifar" and params.train_diffusion.adversarial.mode == "adversarial"
    assert params.generate.steps == 20
    # select_1M: 5M candidates, the 20% per class the standard (non-robust) WRN-28-10 is most sure of
    g, r = params.generate, params.train_reference
    assert (g.per_class * 10, g.filter_keep, g.filter_scorer) == (1_000_000, 0.2, "reference")
    assert round(g.per_class / g.filter_keep) * 10 == 5_000_000 and params.mix.synthetic_limit is None
    assert r.model == "wrn-28-10" and params.data.heldout_size == 0
    assert params.generate.guidance == 1  # the paper samples without guidance
    t = params.train
    assert (t.model, t.loss, t.beta, t.batch_size, t.lr, t.epochs, t.label_smoothing, t.ema_tau) == (
        "wrn-28-10", "trades", 5.0, 512, 0.2, 400, 0.1, 0.995)
    assert params.mix.synthetic_fraction == 0.7
    assert abs(t.attack.eps - 8 / 255) < 1e-12 and t.attack.steps == 10


def test_training_attack_step_size_is_derived_unless_set() -> None:
    assert parse_params({}).train.attack.step_size is None
    assert load_params(REPO_ROOT / "params.yaml").train.attack.step_size is None
    assert parse_params({"train": {"attack": {"step_size": "2/255"}}}).train.attack.step_size == 2 / 255
    with pytest.raises(ParamsError, match=r"train\.attack\.step_size = 0\.0 is not allowed: expected a number .*> 0"):
        parse_params({"train": {"attack": {"step_size": 0}}})


def test_new_sections_reject_bad_values() -> None:
    for raw, key in [({"train": {"loss": "mart"}}, "train.loss"),
                     ({"train": {"attack": {"norm": "L1"}}}, "train.attack.norm"),
                     ({"train_diffusion": {"adversarial": {"mode": "strong"}}}, "train_diffusion.adversarial.mode"),
                     ({"train_diffusion": {"adversarial": {"floor_min": 0.5, "floor_max": 0.1}}},
                      "train_diffusion.adversarial.floor_min"),
                     ({"train_diffusion": {"adversarial": {"fraction": 0}}}, "train_diffusion.adversarial.fraction"),
                     ({"train_diffusion": {"adversarial": {"fraction": 1.5}}}, "train_diffusion.adversarial.fraction"),
                     ({"generate": {"sigma_min": 100}}, "generate.sigma_min"),
                     ({"generate": {"filter_keep": 0.5}}, "generate.filter_keep"),
                     ({"generate": {"filter_keep": 0, "filter_scorer": "reference"}}, "generate.filter_keep"),
                     ({"mix": {"source": "synthetic"}}, "mix.source"),
                     ({"data": {"heldout_size": -1}}, "data.heldout_size"),
                     ({"train_reference": {"epochs": 0}}, "train_reference.epochs"),
                     ({"evaluate_diffusion": {"knn_k": 0}}, "evaluate_diffusion.knn_k"),
                     ({"evaluate_diffusion": {"memorisation_quantile": 0}}, "evaluate_diffusion.memorisation_quantile"),
                     ({"generate": {"guidance": 0.5}}, "generate.guidance"),
                     ({"generate": {"guidance_interval": [5, 0.3]}}, "generate.guidance_interval"),
                     ({"generate": {"guidance_interval": [0.3]}}, "generate.guidance_interval"),
                     ({"generate": {"workers": -1}}, "generate.workers"),
                     ({"mix": {"synthetic_fraction": 1.5}}, "mix.synthetic_fraction"),
                     ({"train": {"attack": {"eps": "8/0"}}}, "train.attack.eps")]:
        with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
            parse_params(raw)


@pytest.mark.parametrize(("raw", "allowed"), [
    ({"sigmas": []}, "non-empty list of numbers > 0"), ({"sigmas": [0.2, 0]}, "non-empty list of numbers > 0"),
    ({"sigmas": [0.2, 0.2]}, "distinct"), ({"radius_rho": 0}, "> 0"), ({"n_real": 1}, ">= 2"),
    ({"attack_steps": 0}, ">= 1"), ({"inception_weights": ""}, "matching")])
def test_evaluate_diffusion_rejects_bad_values(raw: dict, allowed: str) -> None:
    with pytest.raises(ParamsError, match=r"evaluate_diffusion\.") as caught:
        parse_params({"evaluate_diffusion": raw})
    assert allowed in str(caught.value)


def test_evaluate_diffusion_measures_every_profile_in_one_box() -> None:
    """The box is the same yardstick at CPU and paper scale, whatever AT mode trained the model."""
    cpu = load_params(REPO_ROOT / "params.yaml").evaluate_diffusion
    paper = load_profile("profiles/paper-cifar10.yaml", REPO_ROOT)[0].evaluate_diffusion
    assert (cpu.radius_rho, cpu.radius_floor, cpu.sigmas) == (paper.radius_rho, paper.radius_floor, paper.sigmas)
    assert paper.n_real == 10_000 and cpu.inception_weights is None and paper.inception_weights is None
