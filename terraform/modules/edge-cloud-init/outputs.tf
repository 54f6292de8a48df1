output "user_data" {
  description = "cloud-init user data (#cloud-config). Contains the agent's private key."
  value       = local.user_data
  sensitive   = true
}

output "meta_data" {
  description = "cloud-init meta data (instance-id, local-hostname)."
  value       = local.meta_data
}
