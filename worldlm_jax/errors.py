"""The error every layer raises for a bad value a user gave (a config field, an
override, a plug-in name); its message is one line naming the field and the fix
(docs/errors.md). A leaf: it imports nothing, so the plug-in loader and the
config schema, which sit on different floors, can both raise it."""


class ConfigError(ValueError):
    """A bad config value or override; the message names the key and the fix."""
