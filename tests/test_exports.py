"""The public surface stays small and deliberate (changing it should be a conscious act)."""

import composer


def test_public_names():
    assert sorted(composer.__all__) == [
        "ComposerServer", "ConfigError", "Reason", "RouteTable", "load",
    ]
    for name in composer.__all__:
        assert getattr(composer, name) is not None
