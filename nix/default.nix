# nixstream's Nix library: image functions shaped like nixpkgs' dockerTools
# ones, made of plain derivations (no nixpkgs needed) whose builder is
# nixstream itself.
#
#   let ns = import ./nix { nixstream = /path/to/nixstream; };   # or a derivation with bin/nixstream
#   in ns.buildImage { name = "app"; contents = [ app ]; config.Cmd = [ "${app}/bin/app" ]; }
#
# streamImage: a small directory (conf.json with the planned layers and the
#   customisation layer) that references the whole closure but holds no
#   archive; `nixstream stream ./result | docker load` streams the image.
# buildImage: the image archive itself in $out (built from streamImage's
#   output, so both give the same bytes).
# See docs/nix.md for every argument.
{ nixstream
, system ? builtins.currentSystem
}:
let
  # A derivation's bin/nixstream; a Nix path is copied into the store (a
  # new binary is a new builder); a string is used as it is.
  exe =
    if builtins.isAttrs nixstream then "${nixstream}/bin/nixstream"
    else if builtins.isPath nixstream then "${nixstream}"
    else nixstream;

  # The image's architecture in Go's naming, as nixpkgs writes it.
  goArch = {
    x86_64-linux = "amd64";
    aarch64-linux = "arm64";
    i686-linux = "386";
    armv7l-linux = "arm";
    powerpc64le-linux = "ppc64le";
    riscv64-linux = "riscv64";
    s390x-linux = "s390x";
  }.${system} or (builtins.head (builtins.split "-" system));

  # Store paths named in a string (the image config): they go into the image
  # like nixpkgs' baseJson references do.  The config string carries them as
  # context, so they are inputs of the derivation that exports their graph.
  storePathsIn = s:
    map builtins.head (builtins.filter builtins.isList
      (builtins.split "(${builtins.storeDir}/[0-9a-df-np-sv-z]{32}-[-.+_?=0-9a-zA-Z]+)" s));

  baseNameOf' = name: builtins.baseNameOf name;

  flag = name: value: if value == null then [ ] else [ "--${name}" (toString value) ];
in
rec {
  streamImage =
    { name
    , tag ? "latest"
    , contents ? [ ]
    , config ? { }
    , fromImage ? null
    , maxLayers ? 100
    , created ? "1970-01-01T00:00:01Z"
    , mtime ? created
    , uid ? 0
    , gid ? 0
    , uname ? "root"
    , gname ? "root"
      # "auto" (nixpkgs' auto-layer, its current default), "popularity"
      # (the popularity contest, nixpkgs' default before) or "stable"
      # (nixstream's planner for layers that survive releases); a
      # layeringPipeline (a list, as nixpkgs takes it) overrides them.
    , planner ? "auto"
    , layeringPipeline ? null
    , architecture ? goArch
      # Hash each store layer in a derivation of its own (see docs/nix.md).
    , layerDigests ? false
      # Also each layer's blob digest so compressed ("gzip", "zstd"), for
      # `stream --format oci-archive --layer-compression …`.
    , layerDigestCompressions ? [ ]
    }@args:
    assert builtins.elem planner [ "auto" "popularity" "stable" ];
    let
      contentsList = if builtins.isList contents then contents else [ contents ];
      configJSON = builtins.toJSON config;
      roots = contentsList ++ storePathsIn configJSON;

      # The plan is read back at evaluation time (import from derivation):
      # one derivation per store layer, named and parameterised by nothing
      # but the layer's paths and owner settings, so an unchanged layer is
      # the same derivation from one image version to the next.
      planned = streamImage (args // { layerDigests = false; });
      # The paths get their context back one by one (storePath, below).
      plan = builtins.fromJSON (builtins.unsafeDiscardStringContext (builtins.readFile "${planned}/conf.json"));
      layerDigest = paths: derivation {
        name = "nixstream-layer-${builtins.substring 33 60 (builtins.baseNameOf (builtins.head paths))}";
        inherit system;
        builder = exe;
        args = [ "layer-digest" "--quiet"
          "--uid" (toString uid) "--gid" (toString gid) "--uname" uname "--gname" gname
          "--mtime" mtime "--store-dir" builtins.storeDir
          "--output" (placeholder "out") ]
          ++ builtins.concatMap (c: [ "--layer-compression" c ]) layerDigestCompressions
          # storePath gives each path its context back: the layer's paths
          # are this derivation's inputs (a remote builder gets them).
          ++ map builtins.storePath paths;
      };
      digestArgs = if layerDigests
        then builtins.concatMap (d: [ "--known-digests" "${d}" ]) (map layerDigest plan.store_layers)
        else [ ];
    in
    derivation {
      name = "${baseNameOf' name}-stream-conf";
      inherit system;
      builder = exe;
      args = [
        "image" ".attrs.json" "--quiet"
        "--emit-conf" (placeholder "out")
        "--tag" "${name}:${tag}"
        "--config" configJSON
        "--max-layers" (toString maxLayers)
        "--created" created
        "--mtime" mtime
        "--uid" (toString uid) "--gid" (toString gid)
        "--uname" uname "--gname" gname
        "--architecture" architecture
        "--store-dir" builtins.storeDir
      ]
      ++ (if layeringPipeline != null then [ "--pipeline" (builtins.toJSON layeringPipeline) ]
          else if planner == "popularity" then [ "--popularity" ]
          else if planner == "stable" then [ "--stable" ] else [ "--auto-layer" ])
      ++ flag "from-image" fromImage
      ++ builtins.concatMap (p: [ "--contents-link" "${p}" ]) contentsList
      ++ digestArgs;
      # The closure graph (paths, references, narSize, narHash) arrives in
      # .attrs.json under "closure", the key nixstream reads it from.
      __structuredAttrs = true;
      exportReferencesGraph.closure = roots;
    } // { imageName = name; imageTag = tag; }
      // (if layerDigests then { layerDigestDrvs = map layerDigest plan.store_layers; } else { });

  buildImage = args:
    let conf = streamImage args;
    in derivation {
      name = "${baseNameOf' args.name}.tar";
      inherit system;
      builder = exe;
      args = [ "stream" "--quiet" "${conf}" "--output" (placeholder "out") ];
    } // { imageName = conf.imageName; imageTag = conf.imageTag; };
}
