# The prod environment: the central DCS stack in AWS.
#
#   cp backend.hcl.example backend.hcl && cp terraform.tfvars.example terraform.tfvars
#   terraform init -backend-config=backend.hcl
#   terraform plan -out plan && terraform apply plan
#
# Then fill the two secrets and run the migration (docs/DEPLOYMENT.md, "AWS").

provider "aws" {
  region = var.region

  default_tags {
    tags = {
      Project     = "dcs"
      Environment = "prod"
      ManagedBy   = "terraform"
    }
  }
}

module "central" {
  source = "../../modules/aggregator-aws"

  name               = "dcs-prod"
  availability_zones = var.availability_zones
  vpc_cidr           = "10.40.0.0/16"
  agent_cidrs        = var.agent_cidrs
  monitoring_cidrs   = var.monitoring_cidrs

  aggregator_image         = var.aggregator_image
  aggregator_desired_count = 3
  aggregator_max_count     = 9
  aggregator_cpu           = 2048
  aggregator_memory        = 4096

  db_instance_class        = "db.r6g.xlarge"
  db_allocated_storage     = 500
  db_backup_retention_days = 35
}

output "agent_endpoint" {
  description = "Point the agents' DNS name (on the aggregator certificate) at this."
  value       = module.central.agent_endpoint
}

output "database_url_secret_arn" {
  description = "Put the aggregator's database URL here."
  value       = module.central.database_url_secret_arn
}

output "tls_secret_arn" {
  description = "Put the aggregator's TLS material here (JSON: ca, cert, key)."
  value       = module.central.tls_secret_arn
}

output "database_endpoint" {
  description = "PostgreSQL host:port."
  value       = module.central.database_endpoint
}

output "database_owner_url_secret_arn" {
  description = "Put the schema owner's database URL here (migrations only)."
  value       = module.central.database_owner_url_secret_arn
}

output "migrate_task_definition_arn" {
  description = "Run this task once before every deployment: it applies the migrations."
  value       = module.central.migrate_task_definition_arn
}
