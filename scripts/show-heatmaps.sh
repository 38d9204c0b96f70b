#!/usr/bin/env bash
# Render the newest heat-map images (Secondary Capture, from pacs-ai's [report] heatmap) of a
# folder as PNG files, with DCMTK's dcmj2pnm, to look at them without a DICOM viewer.
#
#   scripts/show-heatmaps.sh [FOLDER] [OUT] [COUNT]
#
# FOLDER: where the .dcm files are (default /var/lib/pacs-ai/outbox: the spool's outbox, which
# keeps them with [storage] keep_reports = true; or a folder of files taken from the PACS).
# OUT: where the PNGs go (default ./heatmaps). COUNT: how many of the newest (default 10).
# Reports (SR) and other files in FOLDER are passed over: only SOP class 1.2.840.10008.5.1.4.1.1.7.
set -euo pipefail
folder=${1:-/var/lib/pacs-ai/outbox}
out=${2:-./heatmaps}
count=${3:-10}
command -v dcmj2pnm >/dev/null || { echo "dcmj2pnm not found: install DCMTK (apt-get install dcmtk)" >&2; exit 1; }
command -v dcmdump >/dev/null || { echo "dcmdump not found: install DCMTK (apt-get install dcmtk)" >&2; exit 1; }
mkdir -p "$out"
shown=0
while IFS= read -r file; do
    # the SOP class, as DCMTK names it (or its number, for a DCMTK that does not)
    dcmdump +P 0008,0016 "$file" 2>/dev/null \
        | grep -Eq '=SecondaryCaptureImageStorage|\[1\.2\.840\.10008\.5\.1\.4\.1\.1\.7\]' || continue
    png="$out/$(basename "$file" .dcm).png"
    dcmj2pnm --write-png "$file" "$png"
    echo "$png"
    shown=$((shown + 1))
    [ "$shown" -lt "$count" ] || break
done < <(ls -t "$folder"/*.dcm 2>/dev/null)
[ "$shown" -gt 0 ] || echo "no heat-map images in $folder" >&2
