-- CVM health reads the instances booted since its last look.
CREATE INDEX boot_records_last_boot ON boot_records (last_boot);
