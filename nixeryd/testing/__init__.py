"""nixeryd's test kit, installed with the package for plugin authors' tests.

:mod:`nixeryd.testing.conformance` is the storage contract as tests, which
every storage backend runs against itself. Install the ``testing`` extra
(pytest, pytest-twisted) to use it.
"""
