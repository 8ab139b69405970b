variable "hosts" {
  description = "Lab machines by name: their SSH address and role (sandbox_host runs sandboxes; gpu runs training and serving)."
  type = map(object({
    address = string
    role    = string
  }))
  validation {
    condition     = alltrue([for h in values(var.hosts) : contains(["sandbox_host", "gpu"], h.role)])
    error_message = "Each host's role must be \"sandbox_host\" or \"gpu\"."
  }
}

variable "ssh_user" {
  description = "User with passwordless sudo on every host."
  type        = string
  default     = "root"
}

variable "ssh_private_key" {
  description = "Path to the private key that reaches the hosts."
  type        = string
}

variable "install_dir" {
  description = "Where the project is unpacked on each host."
  type        = string
  default     = "/opt/e2e-reme"
}
