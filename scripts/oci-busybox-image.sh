#!/bin/sh
# Builds a minimal OCI image (an OCI image-layout tar, as `ctr image import`
# and `docker load` accept) holding only a static busybox: one uncompressed
# layer with /bin/busybox and /bin/<applet> symlinks. No network needed.
#
# usage: oci-busybox-image.sh OUT.tar [IMAGE-NAME]
#   IMAGE-NAME defaults to localhost/cilium-busybox:latest and is recorded as
#   the io.containerd.image.name annotation (what `ctr image import` names it).
# needs: busybox-static (/bin/busybox), tar, sha256sum
set -eu

out=${1:?usage: $0 OUT.tar [IMAGE-NAME]}
name=${2:-localhost/cilium-busybox:latest}
busybox=${BUSYBOX:-/bin/busybox}

[ -x "$busybox" ] || { echo "$busybox not found: apt-get install busybox-static" >&2; exit 1; }
if LC_ALL=C ldd "$busybox" >/dev/null 2>&1; then
    echo "$busybox is not statically linked: apt-get install busybox-static" >&2
    exit 1
fi
case $(uname -m) in
    x86_64) arch=amd64 ;;
    aarch64) arch=arm64 ;;
    *) arch=$(uname -m) ;;
esac

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
layout=$work/layout
mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/proc" "$root/sys" "$root/dev" "$layout/blobs/sha256"
cp "$busybox" "$root/bin/busybox"
for applet in sh cat echo ip ifconfig wget sleep ls ps hostname timeout; do
    ln -s busybox "$root/bin/$applet"
done
echo "root:x:0:0:root:/:/bin/sh" >"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"
chmod 1777 "$root/tmp"

# put a blob in the layout; prints "<sha256> <size>"
blob() {
    d=$(sha256sum "$1" | cut -d' ' -f1)
    s=$(stat -c %s "$1")
    mv "$1" "$layout/blobs/sha256/$d"
    echo "$d $s"
}

tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$root" -cf "$work/layer.tar" .
set -- $(blob "$work/layer.tar")
layer=$1 layer_size=$2

cat >"$work/config.json" <<EOF
{"architecture":"$arch","os":"linux","config":{"Env":["PATH=/bin"],"Cmd":["/bin/sh"],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:$layer"]},"history":[{"created_by":"scripts/oci-busybox-image.sh"}]}
EOF
set -- $(blob "$work/config.json")
config=$1 config_size=$2

cat >"$work/manifest.json" <<EOF
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:$config","size":$config_size},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:$layer","size":$layer_size}]}
EOF
set -- $(blob "$work/manifest.json")
manifest=$1 manifest_size=$2

tag=${name##*:}
case $tag in */*) tag=latest ;; esac
cat >"$layout/index.json" <<EOF
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:$manifest","size":$manifest_size,"platform":{"architecture":"$arch","os":"linux"},"annotations":{"io.containerd.image.name":"$name","org.opencontainers.image.ref.name":"$tag"}}]}
EOF
echo '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"

tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$layout" -cf "$out" .
echo "$name sha256:$manifest"
