"""The beat schedule: one entry per configured manifest, at the configured crontab, sent to the cpu queue."""

import pytest
from celery.schedules import crontab
from portq.tasks.core.errors import ConfigError
from portq.tasks.core.settings import Settings
from portq.worker.app import make_app


def settings(**env: str) -> Settings:
    return Settings.resolve(env={"PORTQ_BROKER_URL": "redis://127.0.0.1:6379/0", **env})


def test_the_schedule_loads_from_the_settings():
    app = make_app(settings(PORTQ_NIGHTLY_MANIFESTS="/shared/vision.yaml, /shared/text.yaml",
                            PORTQ_NIGHTLY_SCHEDULE="30 1 * * 1-5"))
    schedule = app.conf.beat_schedule
    assert sorted(schedule) == ["nightly-text", "nightly-vision"]
    entry = schedule["nightly-vision"]
    assert entry["task"] == "portq.nightly" and "portq.nightly" in app.tasks
    assert entry["kwargs"] == {"manifest": "/shared/vision.yaml"} and entry["options"] == {"queue": "cpu"}
    assert entry["schedule"] == crontab(minute="30", hour="1", day_of_week="1-5")
    assert make_app(settings()).conf.beat_schedule == {}  # no manifests configured: nothing scheduled


@pytest.mark.parametrize("env, message", [
    ({"PORTQ_NIGHTLY_SCHEDULE": "0 2 * *"}, "is not a crontab line: five fields"),
    ({"PORTQ_NIGHTLY_MANIFESTS": "/m/n.yaml", "PORTQ_NIGHTLY_SCHEDULE": "0 25 * * *"},
     "PORTQ_NIGHTLY_SCHEDULE '0 25 * * *' is not a valid crontab line"),
    ({"PORTQ_NIGHTLY_MANIFESTS": "/a/n.yaml,/b/n.yaml"}, "two nightly manifests are named 'n'"),
])
def test_bad_schedules_are_refused(env, message):
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        make_app(settings(**env))
