output "head_address" {
  description = "The Ray head's host."
  value       = local.head.address
}

output "ray_address" {
  description = "For `ray start --address` and for drivers run on a lab host (`ray.init(address=...)`)."
  value       = "${local.head.address}:${var.ray_port}"
}

output "hosts" {
  description = "Each host: its address, roles, and what it can run (`remed doctor --json` on the host, collected when it was provisioned)."
  value = { for name, s in local.spec : name => {
    address = s.address
    roles   = s.roles
    # The path carries the capabilities' id (an empty slice of it) so that it is unknown until
    # the host is installed: the report is then read after it was fetched, not when the plan is made.
    doctor = (fileexists("${local.facts_dir}/${name}.json${substr(terraform_data.capabilities[name].id, 0, 0)}")
    ? jsondecode(file("${local.facts_dir}/${name}.json")) : null)
  } }
  depends_on = [terraform_data.ray_head, terraform_data.ray_worker]
}
