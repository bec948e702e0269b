"""Other frameworks' checkpoints: :mod:`jaxbn.interop.torch` (imports torch only when called)."""
