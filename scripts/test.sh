#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh Debian machine with Python 3.11, then runs it.
# Debian packages: DCMTK, dicom3tools and Orthanc are the real DICOM peers the tests talk to.
# systemd provides systemd-analyze, which checks deploy/pacs-ai.service (it is not started);
# curl runs the admin guide's metrics commands. orthanc-dicomweb is Orthanc's DICOMweb plugin
# (the STOW-RS destination tests); chromium and chromium-driver run the queue page's browser test;
# prometheus provides promtool, which checks and unit-tests deploy/prometheus/'s alert rules.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for tool in storescu:dcmtk dciodvfy:dicom3tools Orthanc:orthanc systemd-analyze:systemd curl:curl \
            chromium:chromium chromedriver:chromium-driver promtool:prometheus; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need_apt+=("${tool##*:}")
done
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_apt+=(orthanc-dicomweb)
# HAProxy: the load balancer in front of replicas (tests/test_replicas.py); in /usr/sbin.
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need_apt+=(haproxy)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y "${need_apt[@]}"
fi

bash scripts/setup-venv.sh dev
exec .venv/bin/python -m pytest "$@"
