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
# Exit status 0 when it rendered at least one; 1, saying why, when FOLDER holds none (with the
# default keep_reports = false the outbox holds a heat-map image only until it is delivered).
set -euo pipefail
folder=${1:-/var/lib/pacs-ai/outbox}
out=${2:-./heatmaps}
count=${3:-10}
command -v dcmj2pnm >/dev/null || { echo "dcmj2pnm not found: install DCMTK (apt-get install dcmtk)" >&2; exit 1; }
command -v dcmdump >/dev/null || { echo "dcmdump not found: install DCMTK (apt-get install dcmtk)" >&2; exit 1; }
[ -d "$folder" ] || { echo "show-heatmaps.sh: no folder $folder" >&2; exit 1; }
files=$(find "$folder" -maxdepth 1 -name '*.dcm' -type f | wc -l)
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
[ "$shown" -eq 0 ] || exit 0
if [ "$files" -eq 0 ]; then
    echo "show-heatmaps.sh: no heat-map images in $folder: it holds no DICOM files. The spool's" \
        "outbox keeps a report or heat-map image only until every destination has it, unless" \
        "[storage] keep_reports = true (the default is false): set it and restart pacs-ai to" \
        "keep the next ones, or give a folder of heat-map images taken from the PACS." >&2
else
    echo "show-heatmaps.sh: no heat-map images among the $files DICOM files in $folder." \
        "pacs-ai makes one for a film reported as pneumonia (also normal ones with [report]" \
        "heatmap_for_normal = true) when [report] heatmap = true and the model gives saliency" \
        "maps (pacs-ai model shows whether it does)." >&2
fi
exit 1
