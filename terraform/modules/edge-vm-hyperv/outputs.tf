output "vm_name" {
  description = "Name of the Hyper-V VM."
  value       = hyperv_machine_instance.edge.name
}

output "seed_iso_path" {
  description = "The cloud-init seed ISO on the host. It holds the agent's private key: detach and delete it once the agent runs (docs/DEPLOYMENT.md)."
  value       = hyperv_iso_image.seed.destination_iso_file_path
}
