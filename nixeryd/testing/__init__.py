"""nixeryd's test kit, installed with the package for plugin authors' tests.

Install the ``testing`` extra (pytest, pytest-twisted) to use it. Like
:mod:`nixeryd.plugin`, this is public API: a site plugin's tests import from
here rather than from nixeryd's own tests.

:mod:`nixeryd.testing.conformance`
    the storage contract as tests, which every storage backend runs against
    itself: subclass ``StorageConformance`` and provide a started backend;
:mod:`nixeryd.testing.processes`
    an expectation fake for ``runtime.processes``: canned answers for the
    commands a test allows, a failure for any other;
:mod:`nixeryd.testing.memoryhttp`
    real HTTP requests through twisted.web and treq, in memory: for the
    resources a storage backend's ``serve_blob`` answers;
:mod:`nixeryd.testing.harness`
    the whole registry, in memory, over a fake Nix: pull an image built with
    your layering strategy, source or storage backend.
"""
