"""Multi-process training: index sharding, reductions, and a two-process gloo run through torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from mitoseg import distributed

from test_natural import make_pascal, tiny_natural_config


def test_rank_shards_are_disjoint_and_together_are_the_wide_single_process_batches():
    batch, world = 3, 2
    for iteration in range(4):
        shards = [list(distributed.rank_indices(iteration, batch, r, world)) for r in range(world)]
        assert sorted(shards[0] + shards[1]) == list(distributed.rank_indices(iteration, batch * world))
        assert not set(shards[0]) & set(shards[1])
    assert list(distributed.ShardedIndices(1, 3, 2)) == [2, 3, 4, 5]  # one rank: the old range(start*B, stop*B)
    assert list(distributed.ShardedIndices(1, 3, 2, rank=1, world_size=2)) == [6, 7, 10, 11]
    assert len(distributed.ShardedIndices(1, 3, 2, rank=1, world_size=2)) == 4


def test_single_process_helpers_are_no_ops():
    assert distributed.world_size() == 1 and distributed.is_main()
    t = torch.arange(4.0)
    assert distributed.all_reduce_sum(t) is t
    model = torch.nn.Linear(2, 2)
    model(torch.randn(3, 2)).sum().backward()
    before = model.weight.grad.clone()
    distributed.all_reduce_gradients(model.parameters())
    distributed.broadcast_parameters(model)
    distributed.barrier()
    assert torch.equal(model.weight.grad, before)


RUNNER = textwrap.dedent("""
    import os, sys
    import torch
    from mitoseg.engine import trainer as trainer_module

    original_fit = trainer_module.Trainer.fit

    def fit(self):
        summary = original_fit(self)
        # Test instrumentation: every rank reports its final weights (mitoseg writes only from rank 0).
        rank = int(os.environ["RANK"])
        torch.save({"model": self.model.state_dict(), "ema": self.ema.module.state_dict()},
                   os.path.join(os.environ["RANK_WEIGHTS_DIR"], f"rank{rank}.pt"))
        return summary

    trainer_module.Trainer.fit = fit
    from mitoseg.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.filterwarnings("ignore:model.pretrained is not set")
def test_two_process_gloo_run_through_torchrun(tmp_path):
    root = tmp_path / "voc"
    split = make_pascal(root, n_labeled=4, n_unlabeled=4, n_val=3)
    # daw_ddfp: DAW's pooled statistics, the flow's gradient averaging and MixBN all run on two ranks.
    cfg = tiny_natural_config(root, split, "daw_ddfp", iterations=2, val_every=2, log_every=1, checkpoint_every=1,
                              inspect_every=2)
    cfg["data"]["batch_size"] = cfg["data"]["unlabeled_batch_size"] = 1
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    weights = tmp_path / "weights"
    weights.mkdir()
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK_WEIGHTS_DIR": str(weights)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(runner)]
    command = torchrun + ["train", "--config", str(config), "--out", str(out), "--no-progress"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("done: 2/2 iterations") == 1  # rank 0 alone reports

    names = sorted(p.name for p in out.iterdir())
    assert {"last.pt", "best.pt", "metrics.jsonl", "summary.json", "config.json", "tb", "inspect"} <= set(names)
    assert not [n for n in names if ".tmp" in n]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["split"] == "train"] == [1, 2]  # once each: only rank 0 logs
    val = [r for r in records if r["split"] == "val"]
    assert len(val) == 1
    # Each rank evaluated part of the 3 validation images; the reduced matrix counts all of them.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["pixels"] == 3 * (48 * 64 - 2 * 64)
    assert summary["final"]["miou"] == pytest.approx(val[0]["miou"], nan_ok=True)

    # Gradient averaging + buffer broadcast: both ranks end with the same student and teacher.
    rank0 = torch.load(weights / "rank0.pt", weights_only=True)
    rank1 = torch.load(weights / "rank1.pt", weights_only=True)
    for part in ("model", "ema"):
        for name, tensor in rank0[part].items():
            assert torch.equal(tensor, rank1[part][name]), f"{part}.{name} differs between ranks"
    saved = torch.load(out / "last.pt", weights_only=True)
    for name, tensor in rank0["model"].items():
        assert torch.equal(saved["model"][name], tensor), name

    assert isinstance(saved["rng"], list) and len(saved["rng"]) == 2  # every rank's generators

    # Stopped after one iteration and resumed on two processes: the same weights on every rank.
    resumed, resumed_weights = tmp_path / "resumed", tmp_path / "resumed_weights"
    resumed_weights.mkdir()
    env["RANK_WEIGHTS_DIR"] = str(resumed_weights)
    for extra in (["--config", str(config), "--max-iters", "1"], ["--resume"]):
        result = subprocess.run(torchrun + ["train", "--out", str(resumed), "--no-progress", *extra], env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in range(2):
        continued = torch.load(resumed_weights / f"rank{rank}.pt", weights_only=True)
        for part in ("model", "ema"):
            for name, tensor in rank0[part].items():
                assert torch.equal(continued[part][name], tensor), f"rank {rank}: {part}.{name} differs after resume"
