from nixeryd.nixbuild import nix_error_excerpt


def test_evaluation_errors_start_at_the_error_line() -> None:
    stderr = [
        "warning: unknown setting",
        "error: nixeryd-test: this package fails to evaluate",
        "(use '--show-trace' to show detailed location information)",
    ]
    assert nix_error_excerpt(stderr) == "error: nixeryd-test: this package fails to evaluate"


def test_build_failures_carry_the_builders_last_lines() -> None:
    stderr = [
        "this derivation will be built:",
        "  /nix/store/3s80paxnccxkia32a3fvhavjam8c16c7-broken-build-1.0.drv",
        "building '/nix/store/3s80paxnccxkia32a3fvhavjam8c16c7-broken-build-1.0.drv'...",
        "broken-build: configuring",
        "nixeryd-test: this build fails on purpose",
        "error: builder for '/nix/store/3s80p-broken-build-1.0.drv' failed with exit code 1",
    ]
    assert nix_error_excerpt(stderr).splitlines() == [
        "error: builder for '/nix/store/3s80p-broken-build-1.0.drv' failed with exit code 1",
        "last lines of the build log:",
        "broken-build: configuring",
        "nixeryd-test: this build fails on purpose",
    ]


def test_without_an_error_line_the_last_lines_are_shown() -> None:
    assert nix_error_excerpt(["a", "", "b"]) == "a\nb"
    assert nix_error_excerpt([]) == "Nix failed without an error message"
