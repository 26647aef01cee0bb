"""What can go wrong turning a valid policy into Envoy resources."""

from __future__ import annotations


class TranslationError(ValueError):
    """The policy (or its runtime inputs) cannot be expressed as Envoy config."""


class MissingCredentialError(TranslationError):
    """A provider's policy names a credential, but the caller resolved no value for it."""

    def __init__(self, provider: str) -> None:
        super().__init__(
            f"provider {provider!r} has a credential in the policy but no resolved value"
        )
        self.provider = provider
