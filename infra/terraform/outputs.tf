output "sandbox_hosts" {
  description = "Addresses of hosts that run sandboxes (one fleet actor each)."
  value       = [for name, h in var.hosts : h.address if h.role == "sandbox_host"]
}

output "gpu_hosts" {
  description = "Addresses of hosts for training and serving."
  value       = [for name, h in var.hosts : h.address if h.role == "gpu"]
}
