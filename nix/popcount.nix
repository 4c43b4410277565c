# `nixeryd popcount`: the derivations of a package set whose references it counts.
#
#   nix-instantiate --eval --strict --json --read-write-mode nix/popcount.nix \
#     --arg path /abs/pkgs --argstr attrs '["hello","tools.greeter"]' --argstr system x86_64-linux
#
# Without attrs ("[]"): every top-level attribute that is a derivation, and those of
# nested attribute sets marked `recurseForDerivations = true` (nix-env's and Hydra's
# convention; nixpkgs marks e.g. `python3Packages`). With attrs: exactly those attribute
# paths ("." separates nested names). Attributes that fail to evaluate (a `throw`, an
# assertion, a broken or unfree package) are skipped.
#
# The package set is imported as nixeryd.nix imports a path source: a function is called
# with the subset of { system; config = {}; overlays = []; } its formals name.
#
# Evaluating all of nixpkgs at once takes more memory than most machines have, so
# `nixeryd popcount` asks first for the top-level names only (`--arg names true`: a list of
# strings, nothing forced), then walks them in chunks (`--argstr top '["a","b"]'`: the walk
# above over just those top-level names), each chunk in a fresh process. A chunk that
# fails (an error tryEval cannot catch, such as a missing file) is walked again a name at
# a time in a `nix repl`, which binds the package set once (`evaluator = true`: the result
# is { topLevel = names: ENTRIES; }), so a failing name costs its own evaluation only.
#
# Output: [{"attrPath": "hello", "drvPath": "/nix/store/…drv", "outputPath": "/nix/store/…"}]
{ path
, attrs ? "[]"
, system ? builtins.currentSystem
, names ? false
, top ? null
, evaluator ? false
}:
let
  inherit (builtins) attrNames concatLists concatStringsSep filter foldl' fromJSON
    functionArgs intersectAttrs isAttrs isFunction length split tryEval;

  imported = import path;
  given = { inherit system; config = { }; overlays = [ ]; };
  pkgs =
    if isFunction imported then
      imported (if functionArgs imported == { } then { inherit system; }
                else intersectAttrs (functionArgs imported) given)
    else imported;

  isDerivation = value: isAttrs value && (value.type or null) == "derivation";

  # One entry for a derivation that evaluates, none otherwise.
  entry = attrPath: value:
    let
      forced = tryEval (builtins.deepSeq [ value.drvPath value.outPath ] {
        attrPath = concatStringsSep "." attrPath;
        drvPath = value.drvPath;
        outputPath = value.outPath;
      });
    in
    if forced.success then [ forced.value ] else [ ];

  # The entries under `names` of `set`, whose attribute path is `prefix`.
  walkNames = prefix: set: names: concatLists (map
    (name:
      let attempt = tryEval set.${name}; value = attempt.value; here = prefix ++ [ name ]; in
      if !attempt.success then [ ]
      else if isDerivation value then entry here value
      else if isAttrs value && (tryEval (value.recurseForDerivations or false)).value == true
      then walk here value
      else [ ])
    names);

  walk = prefix: set: walkNames prefix set (attrNames set);

  topLevel = walkNames [ ] pkgs;

  lookup = attrPath:
    let
      names = filter (part: part != [ ] && part != "") (split "\\." attrPath);
      value = tryEval (foldl' (set: name: if isAttrs set then set.${name} or null else null) pkgs names);
    in
    if value.success && isDerivation value.value then entry names value.value else [ ];

  requested = fromJSON attrs;
in
if evaluator then { inherit topLevel; }
else if names then attrNames pkgs
else if top != null then topLevel (fromJSON top)
else if length requested == 0 then walk [ ] pkgs else concatLists (map lookup requested)
