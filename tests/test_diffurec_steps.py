"""DiffuRec / DiffuRecSys inference over a strided subset of the reverse steps (the shared core's respaced
process); bf16 autocast."""
import pytest
import torch
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed

from recbole_diff.config import Config
from recbole_diff.diffusion import GaussianDiffusion
from recbole_diff.utils import get_model

from conftest import SLICE, TINY

SMALL = dict(TINY, hidden_size=16, n_blocks=2, n_heads=2)


def build(name="DiffuRec", **overrides):
    config = Config(model=name, dataset=SLICE, config_dict=dict(SMALL, **overrides), cmd_line=False)
    init_seed(config["seed"], True)
    train, valid, test = data_preparation(config, create_dataset(config))
    model = get_model(name)(config, train._dataset)
    return config, model, train, test


def first_batch(loader):
    batch = next(iter(loader))
    return batch[0] if isinstance(batch, tuple) else batch


@pytest.mark.parametrize("name", ["DiffuRec", "DiffuRecSys"])
def test_a_strided_loop_over_all_steps_equals_the_full_loop(name):
    _, model, _, test = build(name)
    model.eval()
    users = first_batch(test)
    with torch.no_grad():
        full = model.full_sort_predict(users)
        model.sample_steps = model.diffusion.num_steps
        strided = model.full_sort_predict(users)
        model.sample_steps = 4
        fewer = model.full_sort_predict(users)
    assert torch.equal(full, strided)
    assert not torch.equal(full, fewer)


def test_the_core_runs_the_same_loop_for_all_steps_given_as_a_count_or_a_list():
    diffusion = GaussianDiffusion("trunc_lin", 32, parameterization="x0", variance="fixed_large")
    weight = torch.randn(8, 8)

    def model_fn(x_t, t):
        return torch.tanh(x_t @ weight) + 0.01 * t[:, None]

    x_T = torch.randn(5, 8)
    runs = [diffusion.sample(model_fn, x_T=x_T, steps=steps, generator=torch.Generator().manual_seed(0))
            for steps in (None, 32, list(range(31, -1, -1)))]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("steps,sampler", [(4, "ancestral"), (3, "ddim"), (1, "ancestral")])
def test_sample_steps_sets_the_denoiser_calls(steps, sampler):
    _, model, _, test = build(sample_steps=steps, sampler=sampler, length_buckets=1)
    model.eval()
    calls = []
    original = model.denoise
    model.denoise = lambda *a, **k: calls.append(a[4]) or original(*a, **k)
    with torch.no_grad():
        model.full_sort_predict(first_batch(test))
    assert len(calls) == steps and int(calls[-1][0]) == 0  # the last step always lands on x0


def test_ddim_is_deterministic_given_x_T():
    _, model, _, test = build(sampler="ddim", sample_steps=8, lambda_std=0.0)
    model.eval()
    users = first_batch(test)
    with torch.no_grad():
        a = model.full_sort_predict(users)
        b = model.full_sort_predict(users)
    assert torch.equal(a, b)


@pytest.mark.parametrize("key,value,match", [("sample_steps", 0, "sample_steps"), ("sample_steps", 33, "sample_steps"),
                                             ("sampler", "euler", "sampler")])
def test_bad_step_settings_are_refused(key, value, match):
    with pytest.raises(ValueError, match=match):
        build(**{key: value})
