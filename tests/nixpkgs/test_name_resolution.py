"""Name resolution on a real nixpkgs: every name Nixery resolves, nixeryd resolves to the
same attribute.

Nixery's rule is re-stated below as a small Nix expression (``NIXERY_RULE``), written
from its ``prepare-image.nix``: split the name at "."; look the whole path up exactly;
failing that, replace every component that is a key of one table, built from the *top
level's* attribute names that hold an upper-case letter, lower-case -> real name, and
look that path up. A value that is not a derivation still counts as found there.

nixeryd folds case per level, tries "_" before a leading digit, and only selects
derivations, so it resolves more names; the comparison is on attribute paths, which
``nix/nixeryd.nix``'s ``attrPath`` gives without evaluating the packages, so that tens
of thousands of names are compared in one ``nix-instantiate`` run of a few seconds.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.nixinstalls import NixInstallation

EXPRESSION = Path(__file__).resolve().parents[2] / "nix" / "nixeryd.nix"

#: Nested package sets whose names are compared too. The snapshot has no Hackage or
#: CRAN data, so haskellPackages and rPackages cannot be listed there.
NESTED_SETS = ["python3Packages", "perlPackages", "xorg", "ocamlPackages", "luaPackages", "qt6"]

#: Names people write that the generated lists below do not hold.
HAND_PICKED = [
    "SDL2", "sdl2", "Sdl2", "python3packages.numpy", "Python3Packages.NumPy", "xorg.xev",
    "xorg.XEV", "Xorg.xev", "_7zz", "7zz", "python3Packages.PyYAML", "perlpackages.jsonxs",
    "python3packages.fabric", "libx11", "LIBX11", "lib", "xorg", "nosuchpackage",
    "xorg.nosuchpackage", "hello.",
]  # fmt: skip

NIXERY_RULE = r"""
{ nixerydFile, nixpkgs, nestedSets, handPicked }:
let
  inherit (builtins) attrNames concatLists concatStringsSep filter fromJSON groupBy hasAttr
    head isAttrs isString length listToAttrs match replaceStrings split tail;

  pkgs = import nixpkgs { system = "x86_64-linux"; };
  nixeryd = import nixerydFile {
    srcType = "path";
    srcArgs = builtins.toJSON { path = nixpkgs; };
    system = "x86_64-linux";
  };

  upperCase = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" ]
    ++ [ "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  lowerCase = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" ]
    ++ [ "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
  toLower = replaceStrings upperCase lowerCase;
  toUpper = replaceStrings lowerCase upperCase;

  # Nixery: one table, of the top level's names with an upper-case letter, used for
  # every component; listToAttrs keeps the first of equal names (sorted order).
  nixeryTable = listToAttrs (map (k: { name = toLower k; value = k; })
    (filter (k: match ".*[A-Z].*" k != null) (attrNames pkgs)));

  # The dotted path of `comps` from `set`, or null (as lib.attrByPath walks it).
  walk = set: comps: found:
    if comps == [ ] then concatStringsSep "." found
    else if isAttrs set && hasAttr (head comps) set
    then walk set.${head comps} (tail comps) (found ++ [ (head comps) ])
    else null;

  nixery = name:
    let
      path = filter isString (split "\\." name);
      exact = walk pkgs path [ ];
    in
    if exact != null then exact else walk pkgs (map (c: nixeryTable.${c} or c) path) [ ];

  top = attrNames pkgs;
  nested = concatLists (map
    (set: concatLists (map
      (n: [ "${set}.${n}" "${toLower set}.${n}" ]
        ++ [ "${set}.${toLower n}" "${toLower set}.${toLower n}" ])
      (attrNames pkgs.${set})))
    (fromJSON nestedSets));
  names = attrNames (listToAttrs (map (name: { inherit name; value = null; })
    (top ++ map toLower top ++ nested ++ fromJSON handPicked)));

  rows = map (name: { inherit name; nixery = nixery name; nixeryd = nixeryd.attrPath name; }) names;


  # Top-level names that differ only in case, and what their other spellings select.
  caseGroups = map
    (group: {
      inherit group;
      folded = map nixeryd.attrPath (filter (form: !builtins.elem form group)
        [ (toLower (head group)) (toUpper (head group)) ]);
    })
    (filter (group: length group > 1) (builtins.attrValues (groupBy toLower top)));
in
{
  compared = length names;
  nixeryResolves = length (filter (row: row.nixery != null) rows);
  nixerydResolves = length (filter (row: row.nixeryd != null) rows);
  disagreements = filter (row: row.nixery != null && row.nixery != row.nixeryd) rows;
  onlyNixeryd = filter (row: row.nixery == null && row.nixeryd != null) rows;
  exactNotItself = filter (name: nixeryd.attrPath name != name) top;
  inherit caseGroups;
  handPicked = listToAttrs (map (row: { name = row.name; value = row; })
    (filter (row: builtins.elem row.name (fromJSON handPicked)) rows));
}
"""


@pytest.fixture(scope="module")
def comparison(
    modern_nix: NixInstallation, nixpkgs: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    rule = tmp_path_factory.mktemp("names") / "compare.nix"
    rule.write_text(NIXERY_RULE)
    result = subprocess.run(
        [
            str(modern_nix.bin_dir / "nix-instantiate"), "--eval", "--strict", "--json",
            str(rule),
            "--argstr", "nixerydFile", str(EXPRESSION),
            "--argstr", "nixpkgs", str(nixpkgs),
            "--argstr", "nestedSets", json.dumps(NESTED_SETS),
            "--argstr", "handPicked", json.dumps(HAND_PICKED),
        ],
        capture_output=True, text=True, env=modern_nix.env(), timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_every_name_nixery_resolves_selects_the_same_attribute(
    comparison: dict[str, Any],
) -> None:
    assert comparison["compared"] > 50_000
    assert comparison["nixeryResolves"] > 50_000
    for row in comparison["disagreements"]:
        # Only where Nixery's top-level table replaced a nested component that exists as
        # written (e.g. python3Packages' removed alias "Fabric" for "fabric"): nixeryd
        # keeps the exact one.
        requested = row["name"].split(".")
        for index, (theirs, ours) in enumerate(
            zip(row["nixery"].split("."), row["nixeryd"].split("."), strict=True)
        ):
            if theirs != ours:
                assert index > 0 and ours == requested[index], row
                assert theirs.lower() == requested[index], row


def test_an_exact_name_always_selects_itself(comparison: dict[str, Any]) -> None:
    assert comparison["exactNotItself"] == []


def test_names_differing_only_in_case_fold_to_the_first_in_sorted_order(
    comparison: dict[str, Any],
) -> None:
    groups = {tuple(entry["group"]): entry["folded"] for entry in comparison["caseGroups"]}
    assert groups[("libX11", "libx11")] == ["libX11"]
    assert len(groups) > 50
    assert all(set(folded) == {group[0]} for group, folded in groups.items() if folded), groups


def test_nixeryd_resolves_more_than_nixery(comparison: dict[str, Any]) -> None:
    rows = comparison["handPicked"].items()
    picked = {name: (row["nixery"], row["nixeryd"]) for name, row in rows}
    assert picked == {
        "SDL2": ("SDL2", "SDL2"),
        "sdl2": ("SDL2", "SDL2"),
        "Sdl2": (None, "SDL2"),
        "python3packages.numpy": ("python3Packages.numpy", "python3Packages.numpy"),
        "Python3Packages.NumPy": (None, "python3Packages.numpy"),
        "xorg.xev": ("xorg.xev", "xorg.xev"),
        "xorg.XEV": (None, "xorg.xev"),
        "Xorg.xev": (None, "xorg.xev"),
        "_7zz": ("_7zz", "_7zz"),
        "7zz": (None, "_7zz"),
        "python3Packages.PyYAML": (None, "python3Packages.pyyaml"),
        "perlpackages.jsonxs": (None, "perlPackages.JSONXS"),
        "libx11": ("libx11", "libx11"),
        "LIBX11": (None, "libX11"),
        "python3packages.fabric": ("python3Packages.Fabric", "python3Packages.fabric"),
        "lib": ("lib", "lib"),
        "xorg": ("xorg", "xorg"),
        "nosuchpackage": (None, None),
        "xorg.nosuchpackage": (None, None),
        "hello.": (None, None),
    }
    assert comparison["nixerydResolves"] > comparison["nixeryResolves"]


def resolve(nix: NixInstallation, nixpkgs: Path, packages: list[str]) -> dict[str, Any]:
    """nixeryd's report for one image, through ``nix/nixeryd.nix`` as the daemon runs it."""
    result = subprocess.run(
        [
            str(nix.bin_dir / "nix-instantiate"), "--eval", "--strict", "--json",
            "--read-write-mode", str(EXPRESSION),
            "--argstr", "srcType", "path",
            "--argstr", "srcArgs", json.dumps({"path": str(nixpkgs)}),
            "--argstr", "packages", json.dumps(packages),
            "--argstr", "system", "x86_64-linux",
        ],
        capture_output=True, text=True, env=nix.env(), timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_an_image_selects_the_derivations_the_comparison_names(
    modern_nix: NixInstallation, nixpkgs: Path
) -> None:
    report = resolve(modern_nix, nixpkgs, ["sdl2", "7zz", "xorg.XEV", "python3packages.numpy"])
    assert report["missing"] == []
    assert [package["attrPath"] for package in report["packages"]] == [
        "SDL2", "_7zz", "xorg.xev", "python3Packages.numpy",
    ]  # fmt: skip


def test_a_name_that_is_not_a_derivation_is_missing(
    modern_nix: NixInstallation, nixpkgs: Path
) -> None:
    """Nixery finds ``lib`` and fails building it; nixeryd says it is not a package."""
    assert resolve(modern_nix, nixpkgs, ["lib", "xorg", "hello"])["missing"] == ["lib", "xorg"]
