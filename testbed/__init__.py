"""The test bed that the tests (tests/) and the benchmarks (bench/) both run on.

- :mod:`testbed.environment`: the repository's paths, ../shared/data, and external tools, with
  the skip-outside-CI / fail-in-CI policy for what is missing.
- :mod:`testbed.dicom_peers`: pynetdicom peers (a simulated modality, a recording PACS),
  synthetic radiographs, and ``pacs-ai serve`` as a subprocess.
- :mod:`testbed.real_peers`: Orthanc and DCMTK as peers.

It lives outside tests/ so that bench/ need not import the test package, and outside pacs_ai/
because the service never uses it (it is not installed: pyproject packages only pacs_ai and
training).
"""
