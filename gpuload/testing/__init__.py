"""What gpuload's tests and reliability benchmark run against: loopback servers with Range
support and fault injection (``servers``: an HTTP server, a proxy in front of moto's S3, a moto
server in a child process), the fault-injection suite (``faults``) and concurrent writer trials
(``writers``). Shipped so that users can run the same checks against their own deployment; never
imported by the loader itself."""
