"""The centralized reference: its spec from `heron run` options, and its training."""

from __future__ import annotations

from baselines.centralized import CentralizedSpec, centralized_spec, train_centralized


def test_centralized_spec_processes_as_many_samples_as_the_devices() -> None:
    spec = centralized_spec(["--dataset", "mnist", "--data-dir", "D", "--seed", "3",
                             "--devices", "4", "--per-round", "2", "--rounds", "5",
                             "--local-steps", "7", "--batch-size", "16", "--server-lr", "0.01",
                             "--partition", "dirichlet", "--algorithm", "cse-fsl"])
    assert (spec.dataset, spec.data_dir, spec.seed, spec.model) == ("mnist", "D", 3, None)
    assert (spec.steps, spec.steps_per_round, spec.batch_size) == (2 * 5 * 7, 2 * 7, 16)
    assert (spec.optimizer, spec.lr) == ("adam", 0.01)
    default = centralized_spec([])  # `heron run`'s defaults: 3 devices x 20 rounds x 40 steps
    assert (default.steps, default.batch_size, default.lr) == (3 * 20 * 40, 32, 1e-3)


def test_centralized_training_learns_and_is_seeded() -> None:
    spec = CentralizedSpec(dataset="digits", data_dir=None, seed=0, model=None, cut=None,
                           steps=60, steps_per_round=20, batch_size=32, optimizer="adam",
                           lr=3e-3)
    first, again = train_centralized(spec), train_centralized(spec)
    assert first["model"] == "cnn" and first["cut"] == "conv1"  # 8x8 digits: the zoo's cnn
    assert len(first["test_accuracy_per_round"]) == 3
    assert first["samples"] == 60 * 32
    assert first["final_test_accuracy"] > 0.5  # ten classes: chance is 0.1
    assert first["test_accuracy_per_round"] == again["test_accuracy_per_round"]
