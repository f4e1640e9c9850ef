"""Ray Train: `trainer.num_workers=2` runs SFT on two CPU workers (gloo) through TorchTrainer."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.train_toy import write_toy_dataset
from train.common import load_config, prepare_run_dir, read_log



@pytest.fixture
def local_ray(tmp_path_factory):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(tmp_path_factory.mktemp("ray")),
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


def test_sft_on_two_cpu_workers(local_ray, tiny_model_dir: Path, tmp_path: Path):
    from train.ray_train import run_training

    data = write_toy_dataset(tmp_path / "data", n=4)
    run = tmp_path / "sft"
    cfg = load_config("sft", run, ["model=tiny", f"model.path={tiny_model_dir}", f"data.dir={data}", "scale=cpu_workers",
                                   "data.max_frames=1", "trainer.max_steps=3", "trainer.save_steps=3",
                                   "trainer.logging_steps=1", "trainer.gradient_accumulation_steps=1"])
    assert cfg.trainer.num_workers == 2
    result = run_training("sft", cfg, prepare_run_dir("sft", run, cfg))
    assert result["global_step"] == 3
    assert (run / "checkpoints" / "checkpoint-3").is_dir() and (run / "final" / "model.safetensors").exists()
    assert [r["step"] for r in read_log(run) if "loss" in r] == [1, 2, 3]  # rank 0 logs once per step
    assert result["ray_metrics"]["step"] == 3
