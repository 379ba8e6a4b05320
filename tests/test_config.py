import pytest

from graftfl.config import ConfigError, compose_config, expand_sweep


def test_default_config_composes():
    cfg = compose_config([])
    assert cfg.protocol.name == "fedavg" and cfg.dataset.name == "fashion_mnist" and cfg.model.name == "lenet"


@pytest.mark.parametrize(
    "override,message",
    [
        ("protocol=nope", r"valid protocol choices: \[.*'fedavg'"),
        ("dataset=imagenet", r"valid dataset choices: \[.*'digits'"),
        ("model=alexnet", r"valid model choices: \[.*'lenet'"),
        ("lrr=0.1", r"unknown config key 'lrr'; valid keys at the top level: \[.*'rounds'"),
        ("train.lrr=0.1", r"valid keys at 'train': \[.*'lr'"),
        ("data.root=x", r"unknown config key 'data.root'; valid keys at the top level: \[.*'dataset'"),
        ("train.lr.x=1", r"unknown config key 'train.lr.x'; valid keys at 'train.lr': \[\]"),
        ("train.lr=-0.1", r"train.lr must be > 0"),
        ("protocol.fraction_train=1.5", r"must be in \(0, 1\]"),
        ("protocol.fraction_train=0", r"must be in \(0, 1\]"),
        ("num_clients=0", r"num_clients must be >= 1"),
        ("device=tpu", r"device must be auto, cpu, cuda"),
        ("protocol=features privacy=dpsgd", r"protocol=features does not support privacy=dpsgd"),
    ],
)
def test_bad_values_fail_with_a_message_naming_the_valid_ones(override, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(override.split())


def test_target_epsilon_replaces_the_default_noise_multiplier():
    assert compose_config(["privacy=dpsgd"]).privacy.noise_multiplier == 1.0
    cfg = compose_config(["privacy=dpsgd", "privacy.target_epsilon=3"])
    assert cfg.privacy.target_epsilon == 3 and cfg.privacy.noise_multiplier is None


def test_resumed_config_is_validated_as_the_stored_protocol(tmp_path):
    from graftfl.config import resolve_job_config, to_yaml

    run_dir = tmp_path / "split-run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(to_yaml(compose_config(["protocol=split", "dataset=digits"])))
    with pytest.raises(ConfigError, match="cannot resume"):
        resolve_job_config([f"resume={run_dir}"])


def test_dssgd_with_privacy_does_not_resume(tmp_path):
    from graftfl.config import resolve_job_config, to_yaml

    run_dir = tmp_path / "dssgd-run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(to_yaml(compose_config(["protocol=dssgd", "dataset=digits", "privacy=dpsgd"])))
    with pytest.raises(ConfigError, match="cumulative epsilon would be wrong"):
        resolve_job_config([f"resume={run_dir}"])


def test_sweep_expands_the_cross_product():
    jobs = expand_sweep(["rounds=1,2", "dataset=digits,mnist", "seed=3"])
    assert len(jobs) == 4
    assert ["rounds=2", "dataset=mnist", "seed=3"] in jobs


def test_cli_reports_config_errors_without_a_traceback(workdir):
    from tests.conftest import run_graftfl

    proc = run_graftfl("sim", "protocol=nope", cwd=workdir, check=False, timeout=60)
    assert proc.returncode == 2
    assert "valid protocol choices" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_reports_missing_data_with_instructions(workdir):
    from tests.conftest import run_graftfl

    proc = run_graftfl("sim", "dataset=mnist", f"dataset.root={workdir}", "dataset.download=false", cwd=workdir, check=False, timeout=60)
    assert proc.returncode == 2
    assert "MNIST not found" in proc.stderr and "dataset.download" in proc.stderr
