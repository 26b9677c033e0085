"""ich: head-CT DICOM -> Zarr -> CNN-RNN hemorrhage detection."""
