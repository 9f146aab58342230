"""Tests of the multi-seed study in benchmarks/charlm_study.py and charlm_inference.py."""

import dataclasses
import json
import math
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / 'benchmarks'))

import charlm_inference  # noqa: E402
import charlm_report  # noqa: E402
import charlm_study  # noqa: E402

# A study small enough to train in seconds: 4 steps of a 1-layer, 16-wide model.
TINY = charlm_study.Settings(
    steps=4,
    rates=(1e-3, 1e-2),
    rate_factor=10.0,
    max_extensions=1,
    seeds=(0, 1),
    eval_interval=2,
    curve_iters=1,
    final_iters=1,
    keep_fractions=(0.25,),
    target_margin=0.05,
    config_overrides=(
        ('n_layer', 1),
        ('d_model', 16),
        ('n_head', 2),
        ('block_size', 8),
        ('batch_size', 2),
        ('warmup_steps', 1),
    ),
)


def test_grokfast_ema_matches_numpy():
  alpha, lamb = 0.9, 2.0
  transform = charlm_study.grokfast_ema(alpha, lamb)
  rng = np.random.default_rng(0)
  grads = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(3)]
  state = transform.init({'w': jnp.zeros((3, 4))})
  ema = grads[0]  # the reference implementation starts the EMA at the first gradient
  for g in grads:
    out, state = transform.update({'w': jnp.asarray(g)}, state)
    ema = alpha * ema + (1 - alpha) * g
    np.testing.assert_allclose(out['w'], g + lamb * ema, rtol=1e-5, atol=1e-6)


def test_time_to_target_interpolates():
  curve = [(0, 4.0, 0.0), (10, 3.0, 1.0), (20, 2.0, 3.0)]
  assert charlm_report.time_to_target(curve, 2.5) == pytest.approx((15.0, 2.0))
  assert charlm_report.time_to_target(curve, 3.0) == pytest.approx((10.0, 1.0))
  assert charlm_report.time_to_target(curve, 1.9) is None


def test_mean_std_uses_sample_deviation():
  assert charlm_report.mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
  assert charlm_report.mean_std([5.0]) == (5.0, 0.0)


def test_confidence_interval_uses_t_quantile():
  # Mean 2, sample std 1, n = 3: half width t(0.975, 2) / sqrt(3) = 4.303 / 1.732.
  low, high = charlm_report.confidence_interval_95([1.0, 2.0, 3.0])
  assert low == pytest.approx(2.0 - 4.303 / math.sqrt(3))
  assert high == pytest.approx(2.0 + 4.303 / math.sqrt(3))
  assert charlm_report.confidence_interval_95([1.0]) is None


def _fake_train(losses_by_lr):
  calls = []

  def train_run(self, key, variant, lr, seed):
    calls.append((variant.name, lr, seed))
    np.savez(self.params_path(key))  # stands for the weights that a real run saves
    return {
        'key': key,
        'variant': dataclasses.asdict(variant),
        'lr': lr,
        'seed': seed,
        'settings': json.loads(json.dumps(dataclasses.asdict(self.settings))),
        'final_val_loss': losses_by_lr(lr),
        'best_val_loss': losses_by_lr(lr),
        'ms_per_step': 1.0,
        'curve': [(0, 4.0, 0.0), (2, 3.0, 0.5), (4, losses_by_lr(lr), 1.0)],
    }

  return calls, train_run


@pytest.mark.parametrize(
    'optimum, expected_rates',
    [
        (1.0, [1e-3, 1e-2, 1e-1, 1.0, 10.0]),  # grows twice, then stops at max_extensions
        (1e-4, [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]),
        (1e-2, [1e-3, 1e-2, 1e-1]),  # the best rate is inside the grid
    ],
)
def test_sweep_extends_grid_at_best_end(
    tmp_path, monkeypatch, optimum, expected_rates
):
  settings = dataclasses.replace(TINY, rates=(1e-3, 1e-2, 1e-1), max_extensions=2)
  calls, train_run = _fake_train(lambda lr: (math.log10(lr) - math.log10(optimum)) ** 2)
  monkeypatch.setattr(charlm_study.Study, '_train_run', train_run)
  study = charlm_study.Study(settings, tmp_path / 'out', tmp_path / 'params')
  best, records = study.sweep(charlm_study.ADAMW)
  assert [r['lr'] for r in records] == pytest.approx(expected_rates)
  assert best == pytest.approx(min(expected_rates, key=lambda lr: abs(math.log10(lr / optimum))))
  assert sorted(lr for _, lr, _ in calls) == pytest.approx(expected_rates)


def test_full_truncation_keeps_matrix():
  matrix = np.random.default_rng(1).normal(size=(12, 10))
  np.testing.assert_allclose(charlm_inference.truncate_matrix(matrix, 1.0), matrix, atol=1e-12)


def test_concentration_of_single_wave():
  rows, cols = np.meshgrid(np.arange(32), np.arange(48), indexing='ij')
  wave = np.cos(2 * np.pi * (3 * rows / 32 + 5 * cols / 48))  # two conjugate coefficients
  shares = charlm_inference.concentration({'w': wave}, fractions=(0.1,))
  assert shares[0.1] == pytest.approx(1.0)
  noise = np.random.default_rng(2).normal(size=(32, 48))
  # White noise spreads its energy: the top 10% of coefficients hold far less than all of it.
  assert charlm_inference.concentration({'w': noise}, fractions=(0.1,))[0.1] < 0.4
  truncated = charlm_inference.truncate_matrix(wave + 0.01 * noise, 0.01)
  assert np.abs(truncated - wave).max() < 0.05


def test_tiny_study_writes_and_resumes(tmp_path, monkeypatch):
  monkeypatch.setattr(charlm_study, 'QUICK', TINY)
  out, params = tmp_path / 'study', tmp_path / 'params'
  argv = ['--quick', '--out', str(out), '--params-dir', str(params)]
  payload = charlm_study.main(argv)

  names = {'adamw', 'smi'} | {v.name for v in charlm_study.ablations(TINY)}
  if payload['best_rate']['adamw'] != payload['best_rate']['smi']:
    names.add('adamw_at_smi_rate')
  assert set(payload['groups']) == names
  for group in payload['groups'].values():
    assert len(group['seeds']) == len(TINY.seeds)
    assert all(math.isfinite(v) for v in group['final_val_loss'])
  assert payload['groups']['adamw']['final_minus_adamw'] == (0.0, 0.0)
  for name in ('study.json', 'study.md', 'curves.png', 'ablations.png', 'sweep.png'):
    assert (out / name).stat().st_size > 0
  inference = payload['inference']
  assert inference['generation_smi_over_adamw'] > 0
  for row in inference['concentration'].values():
    shares = [row[str(k)][0] for k in charlm_inference.FRACTIONS]
    assert all(0 < s <= 1 for s in shares)
    assert shares == sorted(shares)

  # A second invocation trains nothing; after a run file is lost, only that run trains again.
  calls, train_run = _fake_train(lambda lr: 1.0)
  monkeypatch.setattr(charlm_study.Study, '_train_run', train_run)
  charlm_study.main(argv + ['--skip-inference'])
  assert calls == []

  # An ablation run changes no rate choice, so losing its file retrains it alone.
  ablation = charlm_study.ablations(TINY)[0]
  lost_key = charlm_study.run_key(ablation, payload['best_rate']['smi'], TINY.seeds[1])
  (out / 'runs' / f'{lost_key}.json').unlink()
  charlm_study.main(argv + ['--skip-inference'])
  assert calls == [(ablation.name, payload['best_rate']['smi'], TINY.seeds[1])]

  # A tuned run whose weights are missing trains again for them and keeps its record.
  tuned_key = charlm_study.run_key(charlm_study.ADAMW, payload['best_rate']['adamw'], TINY.seeds[0])
  record_text = (out / 'runs' / f'{tuned_key}.json').read_text()
  (params / f'{tuned_key}.npz').unlink()
  calls.clear()
  charlm_study.main(argv + ['--skip-inference'])
  assert calls == [('adamw', payload['best_rate']['adamw'], TINY.seeds[0])]
  assert (out / 'runs' / f'{tuned_key}.json').read_text() == record_text

  # A run file that is not valid JSON is set aside, not overwritten, and the run trains again.
  broken = out / 'runs' / f'{lost_key}.json'
  broken.write_text('{"truncated": ')
  calls.clear()
  charlm_study.main(argv + ['--skip-inference'])
  assert calls == [(ablation.name, payload['best_rate']['smi'], TINY.seeds[1])]
  assert (out / 'runs' / f'{lost_key}.json.invalid').read_text() == '{"truncated": '

  # A run file made with other study settings is set aside too.
  record = json.loads(broken.read_text())
  record['settings']['steps'] += 1
  broken.write_text(json.dumps(record))
  calls.clear()
  charlm_study.main(argv + ['--skip-inference'])
  assert calls == [(ablation.name, payload['best_rate']['smi'], TINY.seeds[1])]
  kept = json.loads((out / 'runs' / f'{lost_key}.json.other-settings').read_text())
  assert kept['settings']['steps'] == TINY.steps + 1


@pytest.mark.parametrize('flag', ['--out', '--params-dir'])
def test_study_rejects_paths_under_a_file(tmp_path, capsys, flag):
  (tmp_path / 'file').write_text('x')
  argv = ['--quick', '--out', str(tmp_path / 'out'), '--params-dir', str(tmp_path / 'params')]
  argv += [flag, str(tmp_path / 'file')]
  with pytest.raises(SystemExit) as raised:
    charlm_study.main(argv)
  assert raised.value.code == 2
  assert f'{flag} {tmp_path / "file"} exists and is not a directory' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    charlm_study.main(argv[:-1] + [str(tmp_path / 'file' / 'sub')])
  assert 'cannot create the directory' in capsys.readouterr().err

