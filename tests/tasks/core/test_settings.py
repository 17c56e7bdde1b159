import pytest
from portq.tasks.core.errors import ConfigError
from portq.tasks.core.settings import Settings, redact_url


def test_flag_beats_environment_beats_default(tmp_path):
    env = {"PORTQ_BROKER_URL": "redis://envhost:6379/0", "PORTQ_STORE": str(tmp_path / "env")}
    assert Settings.resolve(env={}).broker_url is None
    assert Settings.resolve(env={}).embedded
    s = Settings.resolve(env=env)
    assert s.broker_url == "redis://envhost:6379/0" and s.store == str(tmp_path / "env")
    s = Settings.resolve(env=env, broker_url="redis://flaghost:6379/1", store=str(tmp_path / "flag"))
    assert s.broker_url == "redis://flaghost:6379/1" and s.store == str(tmp_path / "flag")


def test_relative_store_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Settings.resolve(env={}).store == str(tmp_path / "portq-store")


def test_time_limit_must_stay_below_visibility_timeout():
    with pytest.raises(ConfigError, match="must stay below visibility_timeout"):
        Settings.resolve(env={"PORTQ_TASK_TIME_LIMIT": "600", "PORTQ_VISIBILITY_TIMEOUT": "300"})


def test_non_redis_broker_is_refused():
    with pytest.raises(ConfigError, match="redis:// or rediss://"):
        Settings.resolve(env={}, broker_url="amqp://guest@localhost//")


@pytest.mark.parametrize("url, shown", [
    ("redis://:s3cret@host:6379/0", "redis://***@host:6379/0"),
    ("rediss://user:s3cret@host:6380/2?ssl_cert_reqs=required",
     "rediss://***@host:6380/2?ssl_cert_reqs=required"),
    ("redis://host:6379/0?password=s3cret&db=1", "redis://host:6379/0?password=***&db=1"),
    ("redis://host:6379/0", "redis://host:6379/0"),
])
def test_passwords_are_never_displayed(url, shown):
    assert redact_url(url) == shown
    assert "s3cret" not in Settings.resolve(env={}, broker_url=url).broker_display


def test_step_time_limit_must_stay_below_the_job_time_limit():
    with pytest.raises(ConfigError, match="step_time_limit .* must stay below task_time_limit"):
        Settings.resolve(env={"PORTQ_TASK_TIME_LIMIT": "60", "PORTQ_STEP_TIME_LIMIT": "60"})
    assert Settings.resolve(env={"PORTQ_TASK_TIME_LIMIT": "60", "PORTQ_STEP_TIME_LIMIT": "30"}).step_time_limit == 30


def test_rediss_needs_an_explicit_certificate_policy():
    with pytest.raises(ConfigError, match="ssl_cert_reqs"):
        Settings.resolve(env={}, broker_url="rediss://:pw@host:6380/0")
    s = Settings.resolve(env={}, broker_url="rediss://:pw@host:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem")
    assert s.broker_url.startswith("rediss://") and "pw" not in s.broker_display


def test_isolation_and_limits_from_the_environment():
    s = Settings.resolve(env={"PORTQ_ISOLATE": "0", "PORTQ_STEP_MEMORY_LIMIT": "1000000",
                              "PORTQ_MAX_SAMPLE_BYTES": "2048"})
    assert (s.isolate, s.step_memory_limit, s.max_sample_bytes) == (False, 1000000, 2048)
