# The input of scripts/bench-layer-digests: four big store paths copied from
# this machine (libraries, locales, docs, python) and a tiny app naming them,
# whose `message` changes from run to run (one store path changed).
{ nixstream, message ? "v1", layerDigests ? false }:
let
  ns = import ../nix { inherit nixstream; };
  system = builtins.currentSystem;
  copy = name: src: derivation {
    inherit name system;
    builder = "/bin/sh";
    args = [ "-c" "/bin/cp -r ${src} $out" ];
  };
  libs = copy "bench-libs" "/usr/lib/x86_64-linux-gnu";
  locale = copy "bench-locale" "/usr/share/locale";
  doc = copy "bench-doc" "/usr/share/doc";
  py = copy "bench-python" "/usr/lib/python3.11";
  app = derivation {
    name = "bench-app";
    inherit system;
    builder = "/bin/sh";
    args = [ "-c" ''
      /bin/mkdir -p $out/bin
      printf '#!/bin/sh\necho ${message}\n# ${libs} ${locale} ${doc} ${py}\n' > $out/bin/app
      /bin/chmod 555 $out/bin/app
    '' ];
  };
in ns.streamImage { name = "bench"; config.Cmd = [ "${app}/bin/app" ]; inherit layerDigests; }
