# nixeryd's evaluation expression: load a package set, resolve image package names
# in it, and instantiate the derivations. Only Nix builtins are used (no nixpkgs
# lib), so any package set works, including ones built without nixpkgs.
#
# Invocation (all arguments are strings; the structured ones are JSON):
#
#   nix-instantiate --eval --strict --json --read-write-mode nix/nixeryd.nix \
#     --argstr srcType path \
#     --argstr srcArgs '{"path":"/abs/dir"}' \
#     --argstr packages '["hello","tools.greeter"]' \
#     --argstr optionalPackages '["cacert","iana-etc"]' \
#     --argstr system x86_64-linux \
#     --argstr nixpkgsConfig '{"allowUnfree":true}' \
#     --argstr overlays '["/etc/nixeryd/overlay.nix"]'
#
# nixeryd's long-running evaluators (a `nix repl` per package set and system) call it
# without `packages`: the result is then { resolve = { packages, optionalPackages ? "[]" }:
# REPORT; }, with the package set bound once, so that each image evaluated through
# `resolve` reuses what earlier ones evaluated:
#
#   nixeryd = import nix/nixeryd.nix { srcType = "path"; srcArgs = "{\"path\":\"/abs/dir\"}"; }
#   builtins.toJSON (nixeryd.resolve { packages = "[\"hello\"]"; })
#
# and `search { query; }`: the package search's SEARCH REPORT (below); the one-shot form
# is `--argstr search QUERY` in place of `packages`.
#
# That result also has `attrPath NAME`: the attribute path NAME selects by the rule
# below ("python3packages.numpy" -> "python3Packages.numpy"), or null, without
# evaluating the attribute, so that tens of thousands of names are checked in seconds
# (whether it is a derivation is not checked: `resolve` does that).
#
# Arguments:
#   srcType           "path" | "git" | "tarball"
#   srcArgs           JSON object, by srcType:
#                       path:    {"path": ABS}  a directory holding default.nix, or a .nix file
#                       git:     {"url": U, "ref"?: R, "rev"?: 40-hex}  -> builtins.fetchGit with
#                                the keys given and shallow = true, plus allRefs = true when
#                                rev is given without ref, or ref = "HEAD" when neither is
#                                given (Nix 2.8 otherwise fetches "master" from a remote, and
#                                a local checkout's uncommitted working tree).
#                                Nix (2.8 to 2.18) fetches a remote's ref R alone ("git fetch
#                                U R:R", R taken as "refs/heads/R" unless it is "HEAD" or starts
#                                with "refs/"), and nothing when rev is already in its cache;
#                                allRefs fetches "refs/*", every ref: over half a minute for
#                                nixpkgs' 250k refs. So the caller passes the ref a commit was
#                                found through (a tag T as "refs/tags/T") and gives rev
#                                without ref only for a commit at no ref's tip. (Nix cannot
#                                fetch a commit by hash; without ref or allRefs it fetches
#                                "master" (2.8) or the remote's HEAD (2.18) and fails unless
#                                rev is there.) shallow = true lets a file:// checkout that
#                                is a shallow clone, which Nix reads in place, be the
#                                repository (Nix refuses one otherwise; a shallow bare or
#                                remote one it cannot fetch from either way), and skips
#                                revCount, a count of all of rev's history, which nothing
#                                here uses; it does not shorten the fetch itself in these
#                                Nix versions.
#                       tarball: {"url": U, "sha256"?: H}  -> builtins.fetchTarball
#   packages          JSON list of requested names (strings); absent: return `resolve`
#   optionalPackages  JSON list of names added when the package set has them (default [])
#   search            a query: return the SEARCH REPORT instead of resolving packages
#   system            the target system, e.g. "aarch64-linux" (default builtins.currentSystem)
#
#   nixpkgsConfig     JSON object of nixpkgs configuration set by nixeryd's options, or
#                     "null" (default) to leave nixpkgs' configuration alone. Its keys are
#                     nixpkgs `config` keys (allowUnfree, allowBroken,
#                     permittedInsecurePackages, ...), plus two of nixeryd's own:
#                     "configFile" (a Nix file evaluating to a config attribute set, or a
#                     function of { pkgs, lib } as nixpkgs' config.nix may be, laid under
#                     the other keys) and "allowInsecure" (true: every package marked
#                     insecure is allowed, as NIXPKGS_ALLOW_INSECURE=1 does).
#   overlays          JSON list of absolute paths of Nix files, each an overlay function or
#                     a list of them; "[]" (default) leaves nixpkgs' overlays alone.
#
# The package set is the imported value: an attribute set, or a function. A function
# is called with the subset of { system; config; overlays; } that its formals name; a
# function with no named formals (`x: ...` or `{ ... }: ...`) gets { system; }. `config`
# and `overlays` are passed only when nixeryd configures them, or when the function
# requires them (no default; then {} and [] when unconfigured): so nixpkgs reads its
# usual configuration ($NIXPKGS_CONFIG, ~/.config/nixpkgs/config.nix, the overlays
# directory, NIXPKGS_ALLOW_UNFREE=1 and the other NIXPKGS_ALLOW_* variables) unless
# nixeryd is told otherwise, as Nixery lets it.
#
# Name resolution, per requested name: "." separates a nested attribute path
# ("xorg.xev"). Each component is looked up, at its level, as: the exact name; then,
# when it starts with a digit, "_" + name ("9lives" -> "_9lives"); then both of these
# through a table of that level's attribute names lower-cased ("helloworld" ->
# "helloWorld", "haskellpackages.foo" -> "haskellPackages.foo"). A name whose value is
# not a derivation (an attribute set with type = "derivation") is missing. Optional
# names that are missing are dropped silently. Two names resolving to the same
# attribute path are listed once (the first one).
#
# Output (REPORT; with --eval --strict --json), attribute names sorted by Nix:
#   {"missing": [requested names not found, in request order],
#    "packages": [{"attrPath": "tools.greeter", "drvPath": "/nix/store/…drv",
#                  "name": "tools.greeter", "outputPath": "/nix/store/…"}, ...]}
# `packages` holds the requested packages in request order, then the optional ones;
# it is [] whenever `missing` is not (nothing is instantiated then). Forcing drvPath
# writes the .drv files to the store (hence --read-write-mode), so
# `nix-store --realise DRVPATH` builds the package afterwards. outputPath is the
# derivation's outPath (its default output). It cannot be called "outPath": Nix
# prints any attribute set that has an outPath attribute as that string alone
# (--json, builtins.toJSON), so {"outPath": …, "drvPath": …} would come out as "/nix/store/…".
#
# SEARCH REPORT: the package set's top-level attribute names that contain the query
# (a regular expression the caller quotes; names are lower-cased first), sorted, at
# most 50: [{"attrPath": N, "description": D or null, "derivation": bool}]. Only the
# matching attributes are evaluated, each in a tryEval, so that a throwing alias (nixpkgs
# has hundreds) is listed without a description rather than failing the search.
#
# Errors are not caught: a package that fails to evaluate (a `throw`, an assertion,
# nixpkgs' broken/unfree checks) makes nix-instantiate exit non-zero with Nix's own
# message on stderr, e.g. "error: nixeryd-test: this package fails to evaluate".
# nix-instantiate streams its JSON, so stdout may then hold a fragment such as
# `{"missing":`: check the exit status before parsing stdout.
{ srcType
, srcArgs
, packages ? null
, search ? null
, optionalPackages ? "[]"
, system ? builtins.currentSystem
, nixpkgsConfig ? "null"
, overlays ? "[]"
}:
let
  inherit (builtins) attrNames concatStringsSep elem filter foldl' fromJSON functionArgs
    hasAttr head intersectAttrs isAttrs isFunction isString listToAttrs
    replaceStrings split substring tail;

  args = fromJSON srcArgs;

  # The keys of `args` among `names`, and their values.
  pick = names:
    listToAttrs (map (n: { name = n; value = args.${n}; }) (filter (n: hasAttr n args) names));

  source =
    if srcType == "path" then
      (if !(isString (args.path or null)) || substring 0 1 args.path != "/" then
        throw "nixeryd: srcArgs.path must be an absolute path, got ${srcArgs}"
      else /. + args.path)
    else if srcType == "git" then
      builtins.fetchGit (pick [ "url" "ref" "rev" ]
        // { shallow = true; }
        // (if hasAttr "ref" args then { }
            else if hasAttr "rev" args then { allRefs = true; }
            else { ref = "HEAD"; }))
    else if srcType == "tarball" then
      builtins.fetchTarball (pick [ "url" "sha256" ])
    else
      throw "nixeryd: unknown srcType '${srcType}' (expected path, git or tarball)";

  imported = import source;

  configured = fromJSON nixpkgsConfig;
  overlayFiles = fromJSON overlays;

  # nixpkgs' config from nixeryd's options: the config file's, then the options on top.
  # A config that is a function is called by nixpkgs itself with { pkgs, lib }.
  siteConfig =
    let
      fromFile = if configured ? configFile then import (/. + configured.configFile) else { };
      flags = removeAttrs configured [ "configFile" "allowInsecure" ]
        // (if configured.allowInsecure or false then { allowInsecurePredicate = _: true; } else { });
    in
    if isFunction fromFile then nixpkgsArgs: fromFile nixpkgsArgs // flags else fromFile // flags;

  siteOverlays = builtins.concatLists (map
    (file: let overlay = import (/. + file); in if builtins.isList overlay then overlay else [ overlay ])
    overlayFiles);

  # What a package set function is called with: only the arguments it names, and of
  # `config` and `overlays` only those nixeryd configures or the function requires.
  importArgs = formals:
    intersectAttrs formals (
      { inherit system; }
      // (if configured != null then { config = siteConfig; }
          else if formals ? config && !formals.config then { config = { }; } else { })
      // (if overlayFiles != [ ] then { overlays = siteOverlays; }
          else if formals ? overlays && !formals.overlays then { overlays = [ ]; } else { }));

  pkgs =
    if isFunction imported then
      let formals = functionArgs imported; in
      imported (if formals == { } then { inherit system; } else importArgs formals)
    else
      imported;

  toLower = replaceStrings
    [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ]
    [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];

  # lower-cased name -> real name, for one attribute set (the first name in sorted
  # order wins when two differ only in case; exact matches are tried before this).
  lowerTable = set: listToAttrs (map (n: { name = toLower n; value = n; }) (attrNames set));

  # Computed once (lazily: only if some name needs it) for the package set's top level.
  topTable = lowerTable pkgs;

  isDigit = c: elem c [ "0" "1" "2" "3" "4" "5" "6" "7" "8" "9" ];

  # The real attribute name in `set` for the requested component `c`, or null.
  findKey = set: table: c:
    let
      candidates = [ c ] ++ (if isDigit (substring 0 1 c) then [ ("_" + c) ] else [ ]);
      exact = filter (k: hasAttr k set) candidates;
      folded = filter (k: hasAttr k table) (map toLower candidates);
    in
    if exact != [ ] then head exact
    else if folded != [ ] then table.${head folded}
    else null;

  # { value; path = [real names]; } for the component list `comps`, or null.
  resolveIn = set: table: comps: path:
    let key = findKey set table (head comps); in
    if key == null then null
    else
      let
        value = set.${key};
        path' = path ++ [ key ];
        rest = tail comps;
      in
      if rest == [ ] then { inherit value; path = path'; }
      else if isAttrs value then resolveIn value (lowerTable value) rest path'
      else null;

  isDerivation = v: isAttrs v && (v.type or null) == "derivation";

  # { value; path; } for the requested `name`, or null; the value is not forced.
  lookup = name: resolveIn pkgs topTable (filter isString (split "\\." name)) [ ];

  # { name; attrPath; drv; } or null when `name` is not a derivation in the set.
  resolve = name:
    let found = lookup name; in
    if found != null && isDerivation found.value then {
      inherit name;
      attrPath = concatStringsSep "." found.path;
      drv = found.value;
    } else null;

  searchReport = query:
    let
      matching = filter (n: builtins.match ".*${query}.*" (toLower n) != null) (attrNames pkgs);
      shown = builtins.genList (builtins.elemAt matching) (
        if builtins.length matching < 50 then builtins.length matching else 50);
      described = n:
        let
          value = builtins.tryEval (isDerivation pkgs.${n});
          text = builtins.tryEval (
            let d = pkgs.${n}.meta.description or null; in if isString d then d else null);
        in {
          attrPath = n;
          derivation = value.success && value.value;
          description = if value.success && value.value && text.success then text.value else null;
        };
    in
    map described shown;

  # The report for one image: which requested names are missing, or the derivations.
  report = packages: optionalPackages:
    let
      requested = map (name: { inherit name; found = resolve name; }) (fromJSON packages);
      missing = map (r: r.name) (filter (r: r.found == null) requested);

      optional = filter (r: r != null) (map resolve (fromJSON optionalPackages));

      dedup = list: (foldl'
        (acc: p:
          if elem p.attrPath acc.seen then acc
          else { seen = acc.seen ++ [ p.attrPath ]; out = acc.out ++ [ p ]; })
        { seen = [ ]; out = [ ]; }
        list).out;

      selected = dedup (map (r: r.found) requested ++ optional);
    in
    {
      inherit missing;
      packages =
        if missing != [ ] then [ ]
        else map
          (p: {
            inherit (p) name attrPath;
            drvPath = p.drv.drvPath;
            outputPath = p.drv.outPath;
          })
          selected;
    };
in
if search != null then searchReport search
else if packages == null then {
  resolve = { packages, optionalPackages ? "[]" }: report packages optionalPackages;
  search = { query }: searchReport query;
  attrPath = name: let found = lookup name; in
    if found == null then null else concatStringsSep "." found.path;
} else report packages optionalPackages
