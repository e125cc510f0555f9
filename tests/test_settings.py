"""One typed settings object: defaults < BUNDLEREC_* environment < CLI flags."""

from pathlib import Path

import pytest

from bundlerec_server.settings import Settings


def test_precedence_env_then_flags():
    env = {"BUNDLEREC_PORT": "7000", "BUNDLEREC_HISTORY_WEIGHT": "0.5", "BUNDLEREC_ARTIFACT": "/a"}
    s = Settings.load(["--port", "0"], env=env)
    assert s.port == 0  # flag wins
    assert s.history_weight == 0.5  # env applies
    assert s.artifact == Path("/a")


def test_bool_flags_and_env():
    assert Settings.load(["--no-verify-checksums"], env={}).verify_checksums is False
    assert Settings.load([], env={"BUNDLEREC_VERIFY_CHECKSUMS": "false"}).verify_checksums is False


@pytest.mark.parametrize(("env", "message"), [
    ({"BUNDLEREC_PORT": "eighty"}, "BUNDLEREC_PORT"),
    ({"BUNDLEREC_HISTORY_WEIGHT": "1.5"}, "history_weight"),
    ({"BUNDLEREC_RETRIEVAL_MODE": "magic"}, "retrieval_mode"),
])
def test_bad_values_named(env, message):
    with pytest.raises(ValueError, match=message):
        Settings.load([], env=env)


def test_settings_are_frozen():
    s = Settings()
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]
    assert s.replace(port=1).port == 1
