output "vm_id" {
  description = "Managed object id of the VM."
  value       = vsphere_virtual_machine.edge.moid
}

output "ip_address" {
  description = "The VM's primary IP address as VMware Tools reports it."
  value       = vsphere_virtual_machine.edge.default_ip_address
}
