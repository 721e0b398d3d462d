"""Test helpers shipped with mmgrow: the plugin conformance suite (:mod:`mmgrow.testing.conformance`)."""
