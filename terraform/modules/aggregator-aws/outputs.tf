output "vpc_id" {
  description = "The VPC (private subnets only)."
  value       = aws_vpc.main.id
}

output "private_subnet_ids" {
  description = "The private subnets, one per availability zone."
  value       = aws_subnet.private[*].id
}

output "agent_endpoint" {
  description = "host:port agents connect to (aggregator.url = https://NAME:8443, where NAME is on the aggregator's certificate). Point a DNS name at this."
  value       = "${aws_lb.agents.dns_name}:8443"
}

output "privatelink_service_name" {
  description = "Service name customers create their interface endpoint for (null without PrivateLink)."
  value       = try(aws_vpc_endpoint_service.agents[0].service_name, null)
}

output "database_endpoint" {
  description = "host:port of the PostgreSQL instance."
  value       = aws_db_instance.main.endpoint
}

output "database_master_secret_arn" {
  description = "The Secrets Manager secret with the master user's password, managed and rotated by RDS."
  value       = aws_db_instance.main.master_user_secret[0].secret_arn
}

output "database_url_secret_arn" {
  description = "Secret to put the aggregator's database URL in (docs/DEPLOYMENT.md)."
  value       = aws_secretsmanager_secret.database_url.arn
}

output "tls_secret_arn" {
  description = "Secret to put the aggregator's TLS material in, as JSON {ca, cert, key}."
  value       = aws_secretsmanager_secret.tls.arn
}

output "ecs_cluster_name" {
  description = "ECS cluster running the aggregator service."
  value       = aws_ecs_cluster.main.name
}

output "migrate_task_definition_arn" {
  description = "One-off task that applies the migrations as the schema owner; run it before every deployment."
  value       = aws_ecs_task_definition.migrate.arn
}

output "database_owner_url_secret_arn" {
  description = "Secret to put the schema owner's database URL in (migrations only)."
  value       = aws_secretsmanager_secret.database_owner_url.arn
}

output "aggregator_security_group_id" {
  description = "Security group of the aggregator tasks; give it to the migrate task too."
  value       = aws_security_group.aggregator.id
}

output "kms_key_arn" {
  description = "The KMS key encrypting the database, secrets and logs."
  value       = aws_kms_key.main.arn
}
