"""IO: URLs to filesystems (`fs`), exactly-once commits (`commit`)."""
